"""The run's summary line says when real-image tests were skipped for want of the shared images."""
from pathlib import Path

pytest_plugins = ("pytester",)


def test_summary_line_counts_tests_skipped_for_want_of_images(pytester, monkeypatch):
    monkeypatch.setenv("FASTIBOT_TEST_IMAGES", str(pytester.path / "no-such-folder"))
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_inner="""
        import pytest

        def test_needs_images(shared_images):
            pass

        def test_other_skip():
            pytest.skip("unrelated reason")

        def test_plain():
            pass
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=1)  # the unrelated skip stays an ordinary skip
    last = result.outlines[-1]
    assert "1 passed" in last and "1 skipped" in last and "1 skipped: no shared images" in last
    result.stdout.fnmatch_lines(["1 real-image test(s) skipped: shared images not found at *no-such-folder*"])
