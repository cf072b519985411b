"""report.html, heat maps and notebook views: readable, escaped, self-contained, rendered by a real browser."""

import io
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from latentexplainer_plugin.ranking import score_attribution
from latentexplainer_plugin.report.heatmaps import HeatmapWriter, change_map, safe_name, save_heatmap
from latentexplainer_plugin.report.html import render_report, write_report
from latentexplainer_plugin.report.strips import save_strip
from latentexplainer_plugin.results import ExplanationResults, LatentResult
from latentexplainer_plugin.types import Response, Traversal

EVIL = "<script>alert(1)</script>"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class Elements(HTMLParser):
    """Every start tag with its attributes."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def elements(text):
    parser = Elements()
    parser.feed(text)
    return parser.tags


def moving_square(n_bases=2, steps=5, size=16, latent_id="z0"):
    """A bright square moving right one pixel per step on a dark image: the change is where it moves."""
    images = torch.zeros(n_bases, 1, steps, 3, size, size)
    for s in range(steps):
        images[:, 0, s, :, 4:8, 4 + s:8 + s] = 1.0
    return Traversal(latent_id, images, torch.linspace(-3, 3, steps), "set", index=0)


def results_data(**latent_overrides):
    responses = [{"text": "the square moves right", "abstained": False, "error": None},
                 {"text": "the square moves right", "abstained": False, "error": None},
                 {"text": "nothing changes", "abstained": True, "error": None}]
    clear = {"id": "z0", "index": 0, "status": "ok", "explanation": "the square moves right", "certainty": 0.82,
             "clear": True, "responses": responses, "strip": "strips/z0.png", "heatmap": "heatmaps/z0.png",
             "error": None, "timing": {"traverse_s": 0.5, "explain_s": 1.5}, "kl": 2.31, "active": True,
             "factor": {"name": "x position", "score": 0.71, "metric": "normalized_mutual_info"},
             "attribution": 0.25, "attribution_signed": 0.2, "rank": 1, "delta": 1e-7,
             "attribution_method": "IntegratedGradients"} | latent_overrides
    unclear = {"id": "z1", "index": 1, "status": "ok", "explanation": None, "certainty": 0.12, "clear": False,
               "responses": [{"text": "colour changes", "abstained": False, "error": None},
                             {"text": None, "abstained": False, "error": "timeout"}],
               "strip": "strips/z1.png", "error": None, "timing": {"traverse_s": 0.5, "explain_s": 1.0},
               "kl": 0.01, "active": False, "attribution": 0.5, "rank": 2}
    failed = {"id": "z2", "index": 2, "status": "failed", "explanation": None, "certainty": None, "clear": False,
              "responses": [], "strip": None, "error": "backend down", "timing": {}, "attribution": 0.01, "rank": 3}
    return {"schema_version": 1, "model": "demo VAE", "adapter": {"name": "vae", "site": "decoder.input"},
            "backend": {"name": "offline"}, "bias": "disentanglement", "status": "complete", "elapsed_s": 4.2,
            "settings": {"similarity": "bow", "samples": 3, "threshold": 0.4},
            "ranking": {"method": "IntegratedGradients", "score": "mean", "n_inputs": 8, "delta": 1e-7, "seconds": 0.3},
            "latents": [unclear, failed, clear]}


# -- escaping --------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["explanation", "id", "response", "model", "backend", "error", "factor", "method"])
def test_injected_markup_shows_as_text_and_creates_no_element(where):
    data = results_data()
    clear = data["latents"][2]
    if where == "explanation":
        clear["explanation"] = EVIL
        clear["responses"][0]["text"] = EVIL
    elif where == "id":
        clear["id"] = EVIL
    elif where == "response":
        data["latents"][0]["responses"][0]["text"] = EVIL
    elif where == "model":
        data["model"] = EVIL
    elif where == "backend":
        data["backend"] = {"name": EVIL, "model": EVIL}
    elif where == "error":
        data["latents"][1]["error"] = EVIL
    elif where == "factor":
        clear["factor"]["name"] = EVIL
    else:
        clear["attribution_method"] = EVIL
        data["ranking"]["method"] = EVIL
    text = render_report(data)
    assert EVIL not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    tags = elements(text)
    assert not [t for t, _ in tags if t in ("script", "iframe", "object", "embed")]
    assert not [a for _, attrs in tags for a in attrs if a.startswith("on")]


def test_image_paths_must_stay_inside_the_run_directory():
    for bad in ["javascript:alert(1)", "https://example.com/x.png", "/etc/passwd", "../../x.png", "//host/x.png",
                "strips/z0.png' onerror='alert(1)"]:
        text = render_report(results_data(strip=bad, heatmap=bad))
        sources = [attrs.get("src") for tag, attrs in elements(text) if tag == "img"]
        assert bad not in sources and "onerror" not in {a for _, attrs in elements(text) for a in attrs}
        assert all(s and s.startswith("strips/") for s in sources), sources  # only z1's safe strip remains


def test_notebook_table_is_escaped():
    r = LatentResult(EVIL, 0, "ok", explanation=EVIL, certainty=0.9, clear=True,
                     responses=[Response(EVIL)], extras={"attribution": 0.3, "rank": 1})
    f = LatentResult("z1", 1, "failed", error=EVIL)
    text = ExplanationResults([r, f])._repr_html_()
    assert EVIL not in text and "&lt;script&gt;" in text
    assert not [t for t, _ in elements(text) if t == "script"]
    assert "<th>rank</th>" in text


# -- what a reader sees ----------------------------------------------------------------------------

def test_report_shows_every_part_of_a_latent_and_the_run_summary():
    text = render_report(results_data())
    # latents in rank order: z0 (#1), z1 (#2), z2 (#3)
    assert text.index("id='latent-z0'") < text.index("id='latent-z1'") < text.index("id='latent-z2'")
    sections = {attrs["id"]: attrs["class"] for tag, attrs in elements(text) if tag == "section"}
    assert sections == {"latent-z0": "latent clear", "latent-z1": "latent unclear", "latent-z2": "latent failed"}
    assert "no clear explanation" in text and "the square moves right" in text
    assert "<details>" in text and "(kept)" in text and "(abstains)" in text and "failed: timeout" in text
    assert "class='bar'" in text and "certainty 0.82" in text and "class='thr'" in text
    assert "attribution 0.25" in text and "rank 1" in text and "convergence delta 1e-07" in text
    assert "src='heatmaps/z0.png'" in text and "src='strips/z0.png'" in text
    assert "KL 2.31" in text and "KL 0.01 (collapsed)" in text and "captures <b>x position</b>" in text
    for summary in ("demo VAE", "offline", "disentanglement", "bow similarity", "IntegratedGradients of score mean over 8 inputs",
                    "4.2 s total", "traversals 1.0 s", "explanations 2.5 s", "1 clear, 1 no clear explanation, 1 failed"):
        assert summary in text, summary
    assert "http://" not in text and "https://" not in text  # nothing loads from the network


def test_notebook_plots_are_figures_without_pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    results = ExplanationResults([
        LatentResult("z0", 0, "ok", explanation="x", certainty=0.9, clear=True, extras={"attribution": 0.3, "rank": 1}),
        LatentResult("z1", 1, "ok", certainty=0.1, extras={"attribution": 0.1, "rank": 2}),
        LatentResult("z2", 2, "failed", error="x"),
    ], info={"threshold": 0.4})
    fig = results.plot()
    assert isinstance(fig, Figure) and len(fig.axes) == 2  # certainty and attribution
    fig.savefig(io.BytesIO(), format="png")
    plain = ExplanationResults([LatentResult("z0", 0, "ok", certainty=0.5)]).plot()
    assert len(plain.axes) == 1


# -- heat maps -------------------------------------------------------------------------------------

def test_change_map_is_where_the_image_changes():
    t = moving_square()
    m = change_map(t)
    assert m.shape == (16, 16)
    # each column of the path (4..11) flips once in the 4 step pairs: 1/4 there, 0 elsewhere
    expected = np.zeros((16, 16), dtype=np.float32)
    expected[4:8, 4:12] = 0.25
    np.testing.assert_allclose(m, expected)


def test_score_attribution_is_captum_ig_over_the_image_with_completeness():
    t = moving_square()
    t.images[:, :, -1] *= 0.5  # the last step is dimmer: the mean falls
    attr = score_attribution(t, "mean")
    assert attr.shape == (16, 16, 3)
    first, last = t.images[:, 0, 0], t.images[:, 0, -1]
    change = (last.flatten(1).mean(1) - first.flatten(1).mean(1)).mean()
    assert attr.sum() == pytest.approx(float(change), abs=1e-5)  # IG completeness: pixels sum to the score change
    assert score_attribution(t, lambda x: torch.as_tensor(x.detach().numpy().mean((1, 2, 3)))) is None  # no gradient


def test_heatmap_png_is_written_and_referenced(tmp_path):
    from PIL import Image

    writer = HeatmapWriter(tmp_path)
    result = LatentResult("z0", 0, "ok", traversal=moving_square())
    assert writer(result) == {"heatmap": "heatmaps/z0.png"}
    image = Image.open(tmp_path / "heatmaps" / "z0.png")
    assert image.format == "PNG" and image.width > 300 and np.asarray(image.convert("L")).std() > 5
    # nothing moves: still a picture, with a "no change" panel instead of a captum error
    still = Traversal("z1", torch.full((1, 1, 3, 3, 16, 16), 0.5), torch.tensor([-1.0, 0.0, 1.0]), "set")
    assert save_heatmap(still, tmp_path / "still.png").is_file()
    assert writer(LatentResult("z9", 9, "failed")) == {}
    assert safe_name("../z<1>") == "_z_1_" and safe_name("dir3") == "dir3"


# -- a real browser ------------------------------------------------------------------------------

def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); the screenshot test needs a real browser")
    run = tmp_path / "run"
    data = results_data()
    for e in data["latents"]:
        if e.get("strip"):
            save_strip(moving_square(latent_id=e["id"]), run / e["strip"])
    save_heatmap(moving_square(), run / "heatmaps" / "z0.png")
    data["latents"][2]["explanation"] = EVIL  # must show as text, not run
    data["latents"][2]["responses"][0]["text"] = EVIL
    report = write_report(run, data)
    shot = tmp_path / "shot.png"
    cmd = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           "--window-size=1200,1600", report.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert shot.is_file(), f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    image = Image.open(shot)
    assert image.size == (1200, 1600)
    pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.std() > 10, "the screenshot is blank"
    assert (pixels < 128).mean() > 0.005  # text and images drew dark pixels


# -- why: the latent table, image evidence, named attributes, labelled strips ------------------------

def _evidence(consistent=True, visible=True):
    return {"change": 0.1 if visible else 0.002, "between": 0.17, "ratio": 0.58 if visible else 0.01,
            "consistency": 0.99 if consistent else 0.04, "significance": 6.7 if consistent else 0.3,
            "descriptor_agreement": 0.99, "map_agreement": 0.3, "strips": 10, "visible": visible,
            "consistent": consistent and visible, "strip_changes": [0.1] * 10,
            "reason": "consistent change" if consistent and visible else
            ("inconsistent: the change differs between bases and rows" if visible else "no visible change: <b>x</b>")}


def test_latent_table_comes_first_and_says_why():
    data = results_data(evidence=_evidence())
    data["latents"][0]["evidence"] = _evidence(consistent=False)  # z1: visible but inconsistent
    text = render_report(data)
    table = text[text.index("<table class='latents'>"):text.index("</table>")]
    assert text.index("<table class='latents'>") < text.index("<table class='summary'>") < text.index("<section")
    rows = table.split("<tr>")[2:]  # header, then z0, z1, z2 in rank order
    assert "href='#latent-z0'" in rows[0] and "the square moves right" in rows[0] and "0.82" in rows[0]
    assert "consistent (0.99)" in rows[0] and "x position" in rows[0]
    assert "no clear explanation" in rows[1] and "inconsistent (0.04)" in rows[1] and "0.12" in rows[1]
    assert "failed: backend down" in rows[2]
    # the unclear card says why: the images disagree, not the answers
    card = text[text.index("id='latent-z1'"):text.index("</section>", text.index("id='latent-z1'"))]
    assert "No clear explanation: the images change differently from base to base." in card
    assert "images: changes, but not consistently" in card and "agreement 0.04 over 10 strips" in card


def test_evidence_numbers_and_bars_are_shown_and_escaped():
    text = render_report(results_data(evidence=_evidence()))
    card = text[text.index("id='latent-z0'"):]
    assert "images: consistent" in card and "change 0.100 (0.58 of the variation between bases; needs 0.05)" in card
    assert "agreement 0.99 over 10 strips (z 6.7; needs 3)" in card and card.count("class='bar small'") == 2
    evil = _evidence(visible=False) | {"reason": EVIL}
    text = render_report(results_data(evidence=evil))
    assert EVIL not in text and "&lt;script&gt;" in text


def test_no_heat_map_where_nothing_visibly_changes(tmp_path):
    text = render_report(results_data(evidence=_evidence(visible=False)))
    assert "heatmaps/z0.png" not in text and "No heat map: the images do not change visibly" in text
    assert "heatmaps/z0.png" in render_report(results_data(evidence=_evidence()))
    # the writer does not draw one either
    from latentexplainer_plugin.evidence import traversal_evidence

    still = Traversal("z1", torch.full((5, 1, 3, 3, 16, 16), 0.5), torch.tensor([-1.0, 0.0, 1.0]), "set")
    result = LatentResult("z1", 1, "ok", traversal=still, evidence=traversal_evidence(still))
    assert HeatmapWriter(tmp_path)(result) == {} and not (tmp_path / "heatmaps" / "z1.png").exists()


def test_each_answer_shows_the_attribute_it_names():
    r = LatentResult("z0", 0, "ok", responses=[Response("it moves right", meta={"attribute": "x position"}),
                                               Response("it gets red", meta={"attribute": EVIL}), Response("plain")])
    entry = r.to_json()
    assert [x.get("attribute") for x in entry["responses"]] == ["x position", EVIL, None]
    data = results_data()
    data["latents"][2]["responses"] = entry["responses"]
    text = render_report(data)
    assert "<span class='attr' title='the attribute this answer names'>x position</span> it moves right" in text
    assert EVIL not in text and text.count("class='attr'") == 2


def test_report_strip_is_enlarged_nearest_with_labelled_axes(tmp_path):
    from PIL import Image

    from latentexplainer_plugin.report.strips import labelled_grid

    t = moving_square(n_bases=2, size=16)
    t.row_labels = ["z9 = -1.5"]
    image = labelled_grid(t)
    arr = np.asarray(image.convert("RGB"))
    # 16 px images enlarged 4x (64 px cells), nearest: every 4x4 block of a cell is one colour
    assert image.height > 2 * 64 and image.width > 5 * 64
    label_w = image.width - 5 * (64 + 2) - 2
    cell = arr[2 * 14 + 2 + 2:, label_w + 2:][:64, :64]
    blocks = cell.reshape(16, 4, 16, 4, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()
    np.testing.assert_array_equal(cell[::4, ::4, 0] > 127, t.images[0, 0, 0, 0].numpy() > 0.5)
    assert np.asarray(image.convert("L"))[:28, label_w:].min() < 100  # the strengths are written on top
    assert np.asarray(image.convert("L"))[28:, :label_w].min() < 100  # the rows are labelled
    path = save_strip(t, tmp_path / "z0.png")
    assert Image.open(path).size == image.size
    # the caption names the axes with the run's strengths
    text = render_report(results_data() | {"settings": {"threshold": 0.4, "strengths": [-3, -1.5, 0, 1.5, 3]}})
    assert "columns: z0 moves from -3 to +3 (strength on top); rows: one per base latent" in text


def test_unclear_cards_are_compact_with_their_images_folded():
    text = render_report(results_data())
    card = lambda lid: text[text.index(f"id='latent-{lid}'"):text.index("</section>", text.index(f"id='latent-{lid}'"))]
    unclear, clear = card("z1"), card("z0")
    folded = unclear[unclear.index("<details class='images-folded'>"):]
    assert "<summary>traversal images</summary>" in folded and "src='strips/z1.png'" in folded
    assert "images-folded" not in clear and "src='strips/z0.png'" in clear  # clear cards show their strip
