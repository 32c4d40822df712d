"""CRAYON feedback: files, galleries (top-k against brute force), simulated verdicts, saliency folders."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from modelfix.card import InputSpec, ModelCard
from modelfix.data import Dataset
from modelfix.errors import ModelfixError
from modelfix.feedback import (
    NeuronFeedback,
    SampleFeedback,
    attention_share,
    default_feedback_layer,
    patch_box,
    read_header_comments,
    read_neuron_feedback,
    read_saliency,
    read_sample_feedback,
    simulate_neurons,
    simulate_samples,
    top_activations,
    write_gallery,
    write_neuron_feedback,
    write_neuron_template,
    write_sample_feedback,
    write_sample_template,
    write_saliency,
)
from modelfix.feedback import gallery as gallery_mod
from modelfix.feedback import saliency_files as saliency_mod
from modelfix.zoo import Classifier, build_model, default_input_spec


def _spec(c: int, h: int, w: int) -> InputSpec:
    return InputSpec(c, h, w, (0.0,), (1.0,))


def _conv_model(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    net = nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(1, 3, 3, padding=1)), ("relu", nn.ReLU()), ("pool", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()), ("fc1", nn.Linear(3 * 4 * 4, 5)), ("relu2", nn.ReLU()), ("fc2", nn.Linear(5, 2)),
    ]))
    return Classifier(net, _spec(1, 8, 8)).eval()


def _tied_data(n_unique: int = 6, copies: int = 2, seed: int = 0) -> Dataset:
    """Every image appears `copies` times (items i and i + n_unique are equal), so every score is tied."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n_unique, 1, 8, 8, generator=g).repeat(copies, 1, 1, 1)
    return Dataset(x=x, y=torch.arange(len(x)) % 2)


def _brute_force(model, data, layer: str, k: int):
    """Full forward over all items; per channel sort items by (score desc, index asc); first maximal cell."""
    acts = []
    handle = dict(model.net.named_modules())[layer].register_forward_hook(lambda m, a, o: acts.append(o))
    with torch.no_grad():
        model(data.x)
    handle.remove()
    act = acts[0]
    if act.dim() == 4:
        flat = act.flatten(2)
        scores = flat.amax(dim=2)
    else:
        scores = act
    values, indices, cells = [], [], []
    for j in range(scores.shape[1]):
        order = sorted(range(len(data)), key=lambda n: (-float(scores[n, j]), n))[:k]
        indices.append(order)
        values.append([float(scores[n, j]) for n in order])
        if act.dim() == 4:
            row = []
            for n in order:
                vals = flat[n, j].tolist()
                first = vals.index(max(vals))
                row.append(divmod(first, act.shape[3]))
            cells.append(row)
        else:
            cells.append([(-1, -1)] * len(order))
    return torch.tensor(values), torch.tensor(indices), torch.tensor(cells)


@pytest.mark.parametrize("batch_size,k", [(4, 7), (5, 3), (64, 12), (1, 2)])
def test_top_activations_conv_matches_brute_force(batch_size, k):
    model, data = _conv_model(), _tied_data()
    top = top_activations(model, data, "pool", k=k, batch_size=batch_size, progress=False)
    values, indices, cells = _brute_force(model, data, "pool", k)
    assert top.map_size == (4, 4) and top.layer == "pool" and top.image_size == (8, 8)
    assert torch.equal(top.indices, indices)
    assert torch.allclose(top.values, values, atol=1e-6)
    assert torch.equal(top.cells, cells)
    # the copies tie: the lower index must come first, right after its twin's score
    assert all(int(top.indices[j, 0]) < 6 for j in range(3))
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("batch_size", [3, 5, 100])
def test_top_activations_dense_layer_with_ties(batch_size):
    torch.manual_seed(1)
    net = nn.Sequential(OrderedDict([("flatten", nn.Flatten()), ("fc1", nn.Linear(16, 6)), ("relu1", nn.ReLU()),
                                     ("fc2", nn.Linear(6, 2))]))
    model = Classifier(net, _spec(1, 4, 4))
    model.train()  # must come back in train mode
    x = torch.rand(11, 1, 4, 4, generator=torch.Generator().manual_seed(2)) - 0.5  # many ReLU zeros → ties
    data = Dataset(x=x, y=torch.zeros(11, dtype=torch.long))
    top = top_activations(model, data, "relu1", k=20, batch_size=batch_size, progress=False)
    model.eval()
    values, indices, cells = _brute_force(model, data, "relu1", 11)  # k > N keeps every item
    assert top.values.shape == (6, 11) and top.map_size == (1, 1)
    assert torch.equal(top.indices, indices) and torch.allclose(top.values, values, atol=1e-6)
    assert bool((top.cells == -1).all()) and bool((values == 0).any())


def test_top_activations_leaves_no_hook_and_restores_mode():
    model, data = _conv_model(), _tied_data()
    model.train()
    top_activations(model, data, "conv", k=2, batch_size=5, progress=False)
    assert all(m.training for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())


def test_default_layer_and_unknown_layer():
    expected = {"mlp": "relu1", "egem-cnn": "relu3", "tap-cnn": "pool2"}
    for arch, name in expected.items():
        model = build_model(ModelCard(arch=arch, num_classes=3, input=default_input_spec(arch)))
        assert default_feedback_layer(model) == name
    assert default_feedback_layer(_conv_model()) == "relu2"
    with pytest.raises(ModelfixError, match="relu2"):
        top_activations(_conv_model(), _tied_data(), "relu_2", progress=False)


def test_patch_box_centre_and_clamp():
    # 4×4 map on 28×28: stride 7, default patch 14
    assert patch_box((1, 2), (4, 4), (28, 28)) == (4, 11, 18, 25)  # centre (10.5, 17.5) − 7, rounded half up
    assert patch_box((0, 0), (4, 4), (28, 28)) == (0, 0, 14, 14)  # −3 shifted to 0
    assert patch_box((3, 3), (4, 4), (28, 28)) == (14, 14, 28, 28)  # 18 shifted to 28 − 14
    assert patch_box((2, 1), (4, 4), (28, 28), patch=5) == (15, 8, 20, 13)  # centre (17.5, 10.5) − 2.5
    assert patch_box((1, 1), (4, 4), (28, 28), patch=40) == (0, 0, 28, 28)  # larger than the image
    assert patch_box((-1, -1), (1, 1), (28, 28)) == (0, 0, 28, 28)  # 2-D layer: the whole image
    # non-square: 2×4 map on 8×16 (stride 4 both ways), patch 4: centre (6, 14) → (4, 12) → shifted to fit
    assert patch_box((1, 3), (2, 4), (8, 16), patch=4) == (4, 12, 8, 16)
    assert patch_box((0, 1), (2, 4), (8, 16)) == (0, 2, 8, 10)  # default 8: centre (2, 6) → (−2, 2) → (0, 2)


# ---- feedback files --------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_neuron_formats_agree(tmp_path):
    csv_file = _write(tmp_path / "n.csv", "# simulated: true\nlayer,neuron,verdict,note\nL,0,Yes,\nL,1,no,\"hair, "
                      "background\"\n,3,PRUNE,\nL,4,,\nL,2,maybe\n")
    yaml_file = _write(tmp_path / "n.yaml", "layer: L\nprune: [1, 3]\nkeep: [0]\n")
    json_obj = _write(tmp_path / "n.json", json.dumps({"layer": "L", "prune": [3, 1], "keep": [0, 2, 4]}))
    json_list = _write(tmp_path / "l.json", json.dumps([True, False, True, False, True]))
    for path in (csv_file, yaml_file, json_obj, json_list):
        fb = read_neuron_feedback(path, 5, layer="L")
        assert fb.prune == [1, 3] and fb.keep == [0, 2, 4] and fb.layer == "L", path
    fb = read_neuron_feedback(csv_file, 5)
    assert fb.verdicts == {0: "yes", 1: "no", 3: "no", 2: "maybe"} and fb.layer == "L"


@pytest.mark.parametrize("text,needle", [
    ("layer,neuron,verdict\nL,0,yes\nL,1,yes,extra,more\n", "row 3: expected 3 columns"),
    ("layer,neuron,verdict\nL,x,yes\n", "row 2: neuron must be an integer"),
    ("layer,neuron,verdict\n# c\nL,1,perhaps\n", "row 3: unknown verdict 'perhaps'"),
    ("layer,neuron,verdict\nL,5,no\n", "row 2 names unknown neuron 5 (layer has 5 channels)"),
    ("layer,neuron,verdict\nL,-1,no\n", "unknown neuron -1"),
    ("layer,neuron,verdict\nL,1,no\nL,1,yes\n", "row 3: neuron 1 is both 'no' and 'yes'"),
    ("layer,neuron,verdict\nM,1,no\n", "row 2: layer 'M' but the feedback is for layer 'L'"),
    ("neuron,verdict\n1,no\n", "row 1: header must be"),
])
def test_bad_neuron_csv(tmp_path, text, needle):
    path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(ModelfixError) as err:
        read_neuron_feedback(path, 5, layer="L")
    assert needle in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_bad_neuron_structured(tmp_path):
    cases = [("a.yaml", "prune: [1]\nkeep: [1]\n", "neuron 1 is both 'no' and 'yes'"),
             ("b.yaml", "prune: [7]\n", "entry prune[0] names unknown neuron 7 (layer has 5 channels)"),
             ("c.json", "[true, false]", "lists 2 neurons but the layer has 5 channels"),
             ("d.json", "[true, 1, true, true, true]", "entry 1"),
             ("e.yaml", "prunes: [1]\n", "unknown key 'prunes'"),
             ("f.txt", "", "must end in .csv")]
    for name, text, needle in cases:
        with pytest.raises(ModelfixError, match=None) as err:
            read_neuron_feedback(_write(tmp_path / name, text), 5)
        assert needle in str(err.value), (name, str(err.value))


def _folder_data() -> Dataset:
    x = torch.zeros(4, 1, 4, 4)
    return Dataset(x=x, y=torch.tensor([0, 0, 1, 1]),
                   info={"source": "folder", "files": ["a/0.png", "a/1.png", "b/2.png", "b/3.png"]})


def test_sample_formats_agree(tmp_path):
    data = _folder_data()
    expected = ["yes", "no", "maybe", "no"]
    files = [
        _write(tmp_path / "s.csv", "sample,verdict,note\na/0.png,keep,\n./a/1.png,N,\nb/2.png,,\nb/3.png,irrelevant,x\n"),
        _write(tmp_path / "s.yaml", "yes: [a/0.png]\nno: [a/1.png, 3]\n"),  # YAML reads yes/no as booleans
        _write(tmp_path / "l.yaml", "- y\n- no\n- skip\n- false\n"),
        _write(tmp_path / "s.json", json.dumps(["yes", "no", "maybe", "no"])),
        _write(tmp_path / "o.json", json.dumps({"a/0.png": "relevant", "a/1.png": "0", "b/3.png": "prune"})),
    ]
    for path in files:
        assert read_sample_feedback(path).for_data(data) == expected, path
    fb = read_sample_feedback(files[1])
    assert fb.counts(data) == {"yes": 1, "no": 2, "maybe": 1}
    plain = Dataset(x=torch.zeros(4, 1, 4, 4), y=torch.zeros(4, dtype=torch.long))  # not folder data: indices
    assert read_sample_feedback(files[3]).for_data(plain) == expected


def test_bad_sample_files(tmp_path):
    data = _folder_data()
    with pytest.raises(ModelfixError, match=r"row 3: unknown verdict 'nope'"):
        read_sample_feedback(_write(tmp_path / "a.csv", "sample,verdict\na/0.png,yes\na/1.png,nope\n"))
    with pytest.raises(ModelfixError, match=r"row 2: expected 2 columns"):
        read_sample_feedback(_write(tmp_path / "b.csv", "sample,verdict\na/0.png\n"))
    with pytest.raises(ModelfixError, match=r"names unknown sample 'c/9.png'.*e\.g\. a/0\.png"):
        read_sample_feedback(_write(tmp_path / "c.csv", "sample,verdict\na/0.png,yes\nc/9.png,no\n")).for_data(data)
    with pytest.raises(ModelfixError, match=r"names unknown sample '4'"):
        read_sample_feedback(_write(tmp_path / "d.json", '{"4": "no"}')).for_data(data)
    with pytest.raises(ModelfixError, match=r"lists 3 verdicts but the data has 4"):
        read_sample_feedback(_write(tmp_path / "e.json", '["yes", "no", "no"]')).for_data(data)
    with pytest.raises(ModelfixError, match=r"two verdicts"):
        read_sample_feedback(_write(tmp_path / "f.json", '{"a/0.png": "no", "0": "yes"}')).for_data(data)
    with pytest.raises(ModelfixError, match=r"entry no\[1\]: sample 'a/0.png' is both"):
        read_sample_feedback(_write(tmp_path / "g.yaml", "yes: [a/0.png]\nno: [b/2.png, a/0.png]\n"))


def test_templates_round_trip(tmp_path):
    data = _folder_data()
    write_neuron_template(tmp_path / "neurons.csv", "layer4", 6)
    fb = read_neuron_feedback(tmp_path / "neurons.csv", 6, layer="layer4")
    assert fb.verdicts == {} and fb.prune == [] and fb.keep == list(range(6))
    write_sample_template(tmp_path / "samples.csv", data.info["files"])
    assert read_sample_feedback(tmp_path / "samples.csv").for_data(data) == ["maybe"] * 4
    filled = NeuronFeedback("layer4", {0: "no", 2: "yes", 5: "no"}, 6)
    write_neuron_feedback(tmp_path / "filled.csv", filled, {"max_artifact_share": 0.5, "rule": "a, b"})
    back = read_neuron_feedback(tmp_path / "filled.csv", 6)
    assert back.verdicts == filled.verdicts and back.layer == "layer4" and back.keep == [1, 2, 3, 4]
    assert read_header_comments(tmp_path / "filled.csv") == {"max_artifact_share": 0.5, "rule": "a, b"}
    samples = SampleFeedback({"a/1.png": "no", "b/3.png": "yes"})
    write_sample_feedback(tmp_path / "s.csv", samples, {"no_above": 0.2}, ids=data.info["files"])
    assert read_sample_feedback(tmp_path / "s.csv").for_data(data) == ["maybe", "no", "maybe", "yes"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


# ---- simulation --------------------------------------------------------------------------------------------------


def _corner_centre_case():
    """Channel 0 sees only a 2×2 artifact in the top-left corner, channel 1 only a blob at rows/cols 4–5."""
    n = 6
    x = torch.zeros(n, 2, 8, 8)
    for i in range(n):
        x[i, 0, 0:2, 0:2] = 0.2 + 0.1 * i
        x[i, 1, 4:6, 4:6] = 0.9 - 0.1 * i
    mask = torch.zeros(n, 1, 8, 8)
    mask[:, :, 0:2, 0:2] = 1
    data = Dataset(x=x, y=torch.arange(n) % 2, mask=mask)
    conv = nn.Conv2d(2, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(2).reshape(2, 2, 1, 1))
    net = nn.Sequential(OrderedDict([("conv", conv), ("pool", nn.MaxPool2d(2)), ("flatten", nn.Flatten()),
                                     ("fc", nn.Linear(32, 2))]))
    return Classifier(net, _spec(2, 8, 8)).eval(), data


def test_simulate_neurons_corner_vs_centre():
    model, data = _corner_centre_case()
    top = top_activations(model, data, "pool", k=4, batch_size=4, progress=False)
    assert top.cells[0].tolist() == [[0, 0]] * 4 and top.cells[1].tolist() == [[2, 2]] * 4
    assert top.indices[0].tolist() == [5, 4, 3, 2] and top.indices[1].tolist() == [0, 1, 2, 3]
    fb, settings = simulate_neurons(top, data)
    assert fb.verdicts == {0: "no", 1: "yes"} and fb.prune == [0] and fb.keep == [1]
    assert settings["patch"] == 4 and settings["max_artifact_share"] == 0.5
    # patch 6: the centre box is rows/cols 2–7 (centre 5 − 3), still clear of the corner
    assert simulate_neurons(top, data, patch=6)[0].prune == [0]
    # patch 8 is the whole image: both hold the 4 artifact pixels, so both go unless 5 are needed
    assert simulate_neurons(top, data, patch=8, min_overlap_pixels=4)[0].prune == [0, 1]
    assert simulate_neurons(top, data, patch=8, min_overlap_pixels=5)[0].prune == []
    # artifact only on half of channel 0's top items: share 0.5 is not more than 0.5 → yes; 0.4 → no
    half = data.with_(has_mask=torch.tensor([True, True, True, True, False, False]))
    assert simulate_neurons(top, half)[0].verdicts[0] == "yes"
    assert simulate_neurons(top, half, max_artifact_share=0.4)[0].verdicts[0] == "no"


def test_simulate_samples_thresholds():
    n = 6
    mask = torch.zeros(n, 1, 8, 8)
    mask[:, :, 0:2, 0:2] = 1  # exactly the map cell (0, 0) of a 4×4 map
    relevant = torch.zeros(n, 1, 8, 8)
    relevant[:, :, 4:8, 4:8] = 1  # the lower-right 2×2 map cells
    data = Dataset(x=torch.zeros(n, 1, 8, 8), y=torch.zeros(n, dtype=torch.long), mask=mask)
    maps = torch.zeros(n, 4, 4)
    maps[0, 0, 0] = 1.0  # f = 1 → no
    maps[1, 0, 0], maps[1, 1, 1] = 0.2, 0.8  # f = 0.2, not above → maybe
    maps[2, 0, 0], maps[2, 1, 1] = 0.21, 0.79  # f = 0.21 → no
    maps[3, 3, 3] = 1.0  # f = 0, all on the relevant cells → yes (with the relevant mask)
    maps[4, 2, 2], maps[4, 1, 1] = 0.5, 0.5  # relevant share 0.5 → yes (at least)
    # maps[5] all zero → maybe
    fb, settings = simulate_samples(maps, data)
    assert fb.for_data(data) == ["no", "maybe", "no", "maybe", "maybe", "maybe"]
    assert settings["no"] == 2 and settings["yes"] == 0 and settings["yes_relevant_at_least"] is None
    fb, settings = simulate_samples(maps, data, relevant_mask=relevant)
    assert fb.for_data(data) == ["no", "maybe", "no", "yes", "yes", "maybe"]
    fb, _ = simulate_samples(maps, data, no_above=0.15, relevant_mask=relevant, yes_relevant_at_least=0.6)
    assert fb.for_data(data) == ["no", "no", "no", "yes", "maybe", "maybe"]
    # area downsampling: one masked pixel of 8×8 is a quarter of map cell (0, 0)
    one = torch.zeros(1, 1, 8, 8)
    one[0, 0, 1, 0] = 1
    assert float(attention_share(torch.ones(1, 4, 4), one)[0]) == pytest.approx(0.25 / 16, abs=1e-12)
    with pytest.raises(ModelfixError, match="non-negative"):
        simulate_samples(-maps, data)


# ---- folders -----------------------------------------------------------------------------------------------------


def test_write_gallery(tmp_path):
    model, data = _corner_centre_case()
    data.info["files"] = [f"c{i % 2}/{i}.png" for i in range(len(data))]
    summary = write_gallery(model, data, tmp_path / "g", layer="pool", k=3, progress=False)
    out = tmp_path / "g"
    assert summary["channels"] == 2 and summary["patch"] == 4 and summary["k"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "neuron_0000.png", "neuron_0001.png",
                                                     "neurons.csv", "patches.json"]
    doc = json.loads((out / "patches.json").read_text())
    first = doc["neurons"][0]["patches"][0]
    assert first == {"item": 5, "sample": "c1/5.png", "cell": [0, 0], "box": [0, 0, 4, 4],
                     "activation": pytest.approx(0.7)}
    img = np.asarray(Image.open(out / "neuron_0000.png"))
    assert img.shape == (48, 3 * 48 + 2 * 2)  # 3 patches of 4 px, ×12 (≥ 48 px), 2 px apart; 2 channels → gray
    assert img[0, 0] == round(0.7 / 2 * 255) == img[23, 23]  # item 5's artifact (mean of 0.7, 0), 2 px ×12
    assert img[0, 24] == 0 and img[24, 0] == 0 and img[0, 48] == 255  # next pixel; then the white gap
    assert "neuron_0001.png" in (out / "index.html").read_text()
    assert read_neuron_feedback(out / "neurons.csv", 2, layer="pool").keep == [0, 1]
    with pytest.raises(ModelfixError, match="not empty"):
        write_gallery(model, data, out, layer="pool", k=3, progress=False)


def test_write_gallery_leaves_nothing_on_error(tmp_path, monkeypatch):
    model, data = _corner_centre_case()
    calls = []
    real = gallery_mod._grid

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(gallery_mod, "_grid", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_gallery(model, data, tmp_path / "g", layer="pool", k=2, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_write_saliency(tmp_path, monkeypatch):
    data = _folder_data()
    data.x[:, 0] = 0.5
    maps = torch.zeros(4, 2, 2)
    maps[:, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    summary = write_saliency(None, data, tmp_path / "s", maps)
    out = tmp_path / "s"
    assert summary == {"samples": 4, "map_size": [2, 2], "out_dir": str(out)}
    assert sorted(p.name for p in out.iterdir()) == ["maps.safetensors", "overlay_00000.png", "overlay_00001.png",
                                                     "overlay_00002.png", "overlay_00003.png", "samples.csv"]
    back, ids = read_saliency(out / "maps.safetensors")
    assert torch.equal(back, maps) and back.dtype == torch.float32 and ids == data.info["files"]
    img = np.asarray(Image.open(out / "overlay_00002.png")).astype(int)
    # bilinear (align_corners=False) puts the map's peak on the top-left 1×1 pixel: fully tinted red there
    assert img[0, 0].tolist() == [round((0.4 * 0.5 + 0.6) * 255), round(0.4 * 0.5 * 255), round(0.4 * 0.5 * 255)]
    assert img[3, 3].tolist() == [round(0.5 * 255)] * 3  # map zero there: the gray image
    assert read_sample_feedback(out / "samples.csv").for_data(data) == ["maybe"] * 4
    assert "overlay_00003.png" in (out / "samples.csv").read_text()

    monkeypatch.setattr(saliency_mod, "write_sample_template", lambda *a, **k: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        write_saliency(None, data, tmp_path / "t", maps)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    with pytest.raises(ModelfixError, match="N×h×w with N = 4"):
        write_saliency(None, data, tmp_path / "u", maps[:3])
