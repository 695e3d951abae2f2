"""The built book as a reader sees it: every page opened in headless Chromium, offline.

The smoke build of test_book.py (shared, see _book_smoke.py) is opened page by page from disk
(``file://``), at 1280 CSS pixels. Each page must show typeset math and no raw LaTeX, no raw
autodoc or reStructuredText markup, load every image, raise no JavaScript error, request nothing
from the network, and fit its tables, code and display equations in the text column; exercise solutions
stay folded until their title is clicked, and citations link to the references page. A screenshot of each chapter goes to
``book/_build/screenshots/`` for a person to look at.

Chromium is Debian's ``chromium`` package (``.ci/run`` installs it). Without it the test skips,
except under CI (``CI`` set), where it fails.
"""
from __future__ import annotations

import os
import shutil
import time

import pytest

from hawqlib.repro import bookbuild

from _book_smoke import ROOT, smoke_book
from _browser import WIDTH, Browser, find_chromium

SHOTS = ROOT / "book" / "_build" / "screenshots"


@pytest.fixture(scope="module")
def chromium() -> str:
    binary = find_chromium()
    if binary is None:
        msg = "headless Chromium not found (apt-get install chromium, or set HAWQ_CHROMIUM)"
        if os.environ.get("CI"):
            pytest.fail(msg + ": under CI the browser check is required")
        pytest.skip(msg)
    return binary


def _is_chapter(doc: str) -> bool:
    return doc.startswith(("method/", "executed/")) or doc in ("intro", "choices", "reproduce", "provenance", "api/index")


@pytest.fixture(scope="module")
def pages(chromium, tmp_path_factory, cifar_root) -> dict[str, dict]:
    run = smoke_book(tmp_path_factory.mktemp("smoke_book"), cifar_root)
    assert run.returncode == 0, f"the smoke book failed:\n{run.output[-6000:]}"
    docs = bookbuild.toc_documents(run.book_dir)
    if SHOTS.exists():
        shutil.rmtree(SHOTS)
    t0 = time.perf_counter()
    browser = Browser(chromium, tmp_path_factory.mktemp("chromium-profile"))
    try:
        tab = browser.tab()
        reports = {doc: tab.inspect((run.html / f"{doc}.html").as_uri(),
                                    SHOTS / f"{doc.replace('/', '__')}.png" if _is_chapter(doc) else None)
                   for doc in docs}
    finally:
        browser.close()
    print(f"\nbrowser check: {len(reports)} pages in {time.perf_counter() - t0:.1f} s; screenshots in {SHOTS}")
    scrolling = {doc: r["scrolling_tables"] for doc, r in reports.items() if r["scrolling_tables"]}
    if scrolling:
        print(f"tables wider than the text column, scrolling in their box at {WIDTH} px: {scrolling}")
    return reports


def _bad(pages: dict, key: str) -> dict:
    return {doc: r[key] for doc, r in pages.items() if r[key]}


def test_no_javascript_error_and_nothing_from_the_network(pages):
    assert not _bad(pages, "js_errors"), _bad(pages, "js_errors")
    assert not _bad(pages, "failed_requests"), _bad(pages, "failed_requests")
    assert not _bad(pages, "remote_requests"), f"pages load from the network: {_bad(pages, 'remote_requests')}"


def test_math_is_typeset_offline(pages):
    assert not _bad(pages, "untypeset"), f"math left as source: {_bad(pages, 'untypeset')}"
    assert not _bad(pages, "mjx_errors"), f"MathJax errors: {_bad(pages, 'mjx_errors')}"
    assert not _bad(pages, "raw_tex"), f"raw LaTeX in the text: {_bad(pages, 'raw_tex')}"
    for doc in ("method/hessian", "method/sensitivity", "executed/hessian_spectrum"):
        assert pages[doc]["typeset"] > 0 and pages[doc]["typeset"] == pages[doc]["math"], (doc, pages[doc])


def test_api_pages_are_rendered_by_autodoc(pages):
    assert not _bad(pages, "raw_rst"), f"raw reStructuredText or autodoc markup: {_bad(pages, 'raw_rst')}"
    # The method's pages sit under api/, the companion floor's under api/companion/ (bookbuild.api_page).
    api = [d for d in pages if d.startswith(("api/hawqlib.", "api/companion/hawqlib."))]
    assert len(api) == len(bookbuild.package_modules())
    packages = {m for m in bookbuild.package_modules() if (ROOT / m.replace(".", "/") / "__init__.py").is_file()}
    empty = [d for d in api if d.rsplit("/", 1)[-1] not in packages and pages[d]["signatures"] == 0]
    assert not empty, f"API pages without a single documented signature: {empty}"


def test_every_image_loads(pages):
    assert not _bad(pages, "broken_images"), _bad(pages, "broken_images")
    assert sum(r["images"] for r in pages.values()) > 0


def test_tables_and_code_fit_a_1280_pixel_page(pages):
    """No table runs off the page (a wide one scrolls inside its box, listed in the output); no code is cut off,
    and no code cell, shown or folded (measured unfolded), has a line too long for the column (it would wrap
    and lose its indentation)."""
    assert not _bad(pages, "wide_tables"), f"tables running off the page at 1280 px: {_bad(pages, 'wide_tables')}"
    assert not _bad(pages, "cut_code"), f"code cut off at the right: {_bad(pages, 'cut_code')}"
    # The check opens the folded cells it finds; none found would mean their markup changed and they went unmeasured.
    assert sum(r["unfolded"] for r in pages.values()) > 0, "no folded code cell found to measure"
    assert not _bad(pages, "wrapped_code"), f"code wrapping at 1280 px: {_bad(pages, 'wrapped_code')}"


def test_a_screenshot_of_every_chapter(pages):
    chapters = [d for d in pages if _is_chapter(d)]
    for doc in chapters:
        shot = SHOTS / f"{doc.replace('/', '__')}.png"
        assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", shot


def test_table_headers_typeset_the_papers_notation(pages):
    """Headers such as lambda_i or ||Q(W)-W||^2 are shown as formulas (hawqlib.repro.pages.MATH_HEADERS)."""
    assert not _bad(pages, "plain_math_headers"), f"plain-text math in table headers: {_bad(pages, 'plain_math_headers')}"
    assert sum(r["math_headers"] for d, r in pages.items() if d.startswith("executed/")) >= 5


def test_equations_fit_the_text_column(pages):
    """Every display equation, as MathJax typesets it, fits the text column at 1280 px (a wider one is clipped
    or scrolls sideways: split it into aligned lines)."""
    assert not _bad(pages, "wide_math"), f"display equations wider than the column: {_bad(pages, 'wide_math')}"
    # The measurement found the equations: a change of MathJax's markup would leave them unmeasured.
    assert sum(r["display_math"] for r in pages.values()) > 10
    widest = max(pages.values(), key=lambda r: r["widest_math"])
    print(f"\nwidest display equation: {widest['widest_math']} px in a {widest['column']} px column "
          f"({widest['title']})")


#: The pages that end with exercises: every method chapter, and the experiment chapters taught from.
EXERCISE_PAGES = ("executed/hessian_spectrum", "executed/bit_allocation", "executed/resnet20_cifar10")


def test_exercises_fold_their_solutions_until_asked(pages):
    with_exercises = [d for d in pages if d.startswith("method/")] + list(EXERCISE_PAGES)
    few = {d: pages[d]["exercises"] for d in with_exercises if pages[d]["exercises"] < 3}
    assert not few, f"chapters with fewer than 3 exercises: {few}"
    unsolved = {d: (r["exercises"], r["solutions"]) for d, r in pages.items() if r["solutions"] < r["exercises"]}
    assert not unsolved, f"exercises without a solution (exercises, solutions): {unsolved}"
    assert not _bad(pages, "open_solutions"), f"solutions shown before they are asked for: {_bad(pages, 'open_solutions')}"
    assert not _bad(pages, "unrevealed_solutions"), \
        f"solutions that do not open when their title is clicked: {_bad(pages, 'unrevealed_solutions')}"


def test_citations_link_to_the_references_page(pages):
    assert pages["references"]["citations"] > 0 and pages["intro"]["citations"] > 0
    assert sum(r["citations"] for d, r in pages.items() if d.startswith("method/")) >= 6
    assert not _bad(pages, "bad_citations"), f"citations not linking to the references: {_bad(pages, 'bad_citations')}"
