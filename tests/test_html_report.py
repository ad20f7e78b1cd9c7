"""report.html: the Markdown subset rendered and escaped, figures embedded, and the page as
headless Chromium shows it (Debian's package; `.ci/run` installs it)."""

from __future__ import annotations

import re
import shutil
import subprocess

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from mechunlearn.report.html import markdown_to_html, render_html, write_html_report  # noqa: E402

MARKDOWN = """# tiny-run

Model tiny; **bold** and `code` spans, and <script>alert(1)</script> stays text.

## Claims

| claim | verdict |
|---|---|
| P(original) <b> | **FLU better** |
| probe accuracy | no decidable difference |

- first point
- second point
"""


def _run_folder(tmp_path):
    folder = tmp_path / "run"
    (folder / "figures").mkdir(parents=True)
    (folder / "results.md").write_text(MARKDOWN, encoding="utf-8")
    (folder / "config.yaml").write_text("name: tiny-run\nseeds: [0, 1]\n", encoding="utf-8")
    (folder / "run.json").write_text('{"model": "tiny", "seconds": 12.5}', encoding="utf-8")
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.bar(["a", "b"], [1, 2], color="tab:red")
    fig.savefig(folder / "figures" / "metrics.png")
    plt.close(fig)
    return folder


def test_markdown_subset_is_rendered_and_everything_else_escaped():
    page = markdown_to_html(MARKDOWN)
    assert "<h1>tiny-run</h1>" in page and "<h2>Claims</h2>" in page
    assert "<strong>bold</strong>" in page and "<code>code</code>" in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert page.count("<tr>") == 3  # header and two rows; the separator is not a row
    assert "<td>P(original) &lt;b&gt;</td>" in page
    assert "<td><strong>FLU better</strong></td>" in page
    assert "<li>first point</li><li>second point</li>" in page


def test_page_embeds_figures_config_and_provenance(tmp_path):
    folder = _run_folder(tmp_path)
    path = write_html_report(folder)
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<title>tiny-run</title>" in page
    assert page.count("<h1>") == 1  # the Markdown's own title, not a second one
    assert re.search(
        r'<img alt="metrics.png" src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"', page
    )
    assert "seeds: [0, 1]" in page and "<th>seconds</th><td>12.5</td>" in page
    assert "http://" not in page and "https://" not in page  # no network assets


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)
def test_headless_chromium_shows_the_tables_and_the_figure(tmp_path):
    folder = _run_folder(tmp_path)
    (folder / "report.html").write_text(render_html(folder), encoding="utf-8")
    flags = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=900,900",
    ]  # fmt: skip
    url = (folder / "report.html").as_uri()
    dom = subprocess.run(
        [*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert dom.count("<table") == 2  # the claims table and the provenance table
    assert dom.count("<img") == 1 and "FLU better" in dom
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True
    )
    pixels = mpimg.imread(shot)
    assert pixels.shape[0] == 900 and pixels.shape[1] == 900
    red = (pixels[..., 0] > 0.7) & (pixels[..., 1] < 0.3) & (pixels[..., 2] < 0.3)
    assert red.sum() > 200  # the embedded bar chart's red bars are on screen
