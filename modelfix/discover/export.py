"""Discovered clusters as repair inputs (docs/discover.md, "Export"): masks of their members, an artifact image cut
from each one's region, CRAYON feedback files and the non-members as a clean pool.

The region is one place shared by all members: SpRAy's clusters group heatmaps by *where* the evidence lies, so a
cluster's artifact sits at one position. It is found in two steps:
1. relevance: the cells of the cluster's score region (`ClusterScore.region`: where the members put more of their
   |relevance| than the reference does), on the pixel grid;
2. appearance: within that region grown by `GROW` pixels (LRP's flat rule and pooling smear relevance over a few
   pixels), the pixels where the members' mean image differs from the mean image of the *non-users* by at least
   `APPEARANCE` × the largest such difference there. Non-users: the other explained items (any class) that put less
   than half as much of their |relevance| into the region as the members do on average. An artifact looks the same
   on every member and is absent where nobody looks at it; a smeared border pixel looks like the background on both
   sides. Contrasting with the non-users, not with every other item, keeps a dark patch (DecoyMNIST's class 9) whose
   corner is bright in other classes' items.

A moving artifact forms one cluster per position; exporting those clusters together masks each member with its
own cluster's region.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import masks_from_bundle, parse_artifact, save_bundle
from ..data.sources import staged_folder
from ..errors import ModelfixError
from ..explain.heatmap import write_bytes_atomic
from ..feedback.files import (NeuronFeedback, SampleFeedback, read_neuron_feedback, read_sample_feedback,
                              sample_ids, write_neuron_feedback, write_sample_feedback)
from ..feedback.gallery import default_feedback_layer, resolve_layer
from ..report import json_safe, write_text_atomic
from .core import ClassClusters, Cluster, DiscoverResult

GROW, APPEARANCE = 2, 0.5
NEURON_SHARE = 0.5  # "no" to a channel when the region supplies at least this share of its activation on members


def _grow(region: Tensor, pixels: int) -> Tensor:
    if pixels <= 0:
        return region
    return F.max_pool2d(region[None, None].float(), 2 * pixels + 1, stride=1, padding=pixels)[0, 0] > 0


def cluster_region(entry: ClassClusters, cluster: Cluster, data, result: DiscoverResult) -> tuple[Tensor, Tensor]:
    """(H×W bool region, dataset indices of the non-users it was contrasted with) of one cluster (module doc)."""
    h, w = entry.maps.shape[1:]
    size = int(round(len(cluster.score.region) ** 0.5))
    cells = cluster.score.region.reshape(size, size)
    if not bool(cells.any()):
        raise ModelfixError(f"--export: cluster {cluster.id} of class {entry.name} has no relevance")
    relevant = F.interpolate(cells[None, None].float(), size=(h, w), mode="nearest")[0, 0] > 0
    members = torch.as_tensor(cluster.members, dtype=torch.long)
    own = _share_in(entry.maps[torch.as_tensor(np.isin(entry.items.numpy(), cluster.members))], relevant).mean()
    rest = []
    for other in result.classes:
        share = _share_in(other.maps, relevant)
        keep = (share < 0.5 * own) & ~torch.as_tensor(np.isin(other.items.numpy(), cluster.members))
        rest.append(other.items[keep])
    rest = torch.cat(rest).sort().values if rest else torch.zeros(0, dtype=torch.long)
    if len(rest) == 0:
        return relevant, rest
    diff = (data.x[members].double().mean(0) - data.x[rest].double().mean(0)).abs().amax(0)
    near = _grow(relevant, GROW)
    peak = float(diff[near].max())
    if peak <= 0:
        return relevant, rest
    region = near & (diff >= APPEARANCE * peak)
    return (region if bool(region.any()) else relevant), rest


def _share_in(maps: Tensor, region: Tensor) -> Tensor:
    """Per map (N×H×W): the share of its |relevance| inside `region` (0 for an all-zero map)."""
    magnitude = maps.double().abs().flatten(1)
    return magnitude[:, region.flatten()].sum(1) / magnitude.sum(1).clamp_min(1e-300)


def region_channels(model: nn.Module, x: Tensor, region: Tensor, fill: Tensor, layer: str,
                    batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """(mean activation, mean drop) per channel of `layer` over the images `x` when the region is replaced by
    `fill` (C×H×W, the other items' mean image). A 4-D output is reduced by its spatial maximum, as galleries do."""
    module = resolve_layer(model, layer)
    captured: list[Tensor] = []
    handle = module.register_forward_hook(lambda m, a, out: captured.append(out.detach()))
    training = {m: m.training for m in model.modules()}
    device = next(iter(model.parameters()), torch.zeros(())).device
    acts, drops = [], []
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                batch = x[start:start + batch_size]
                blanked = torch.where(region, fill.to(batch.dtype), batch)
                captured.clear()
                model(torch.cat([batch, blanked]).to(device))
                out = captured[-1].float().cpu()
                out = out.flatten(2).amax(2) if out.dim() == 4 else out.flatten(1)
                acts.append(out[:len(batch)])
                drops.append(out[:len(batch)] - out[len(batch):])
    finally:
        handle.remove()
        for m, flag in training.items():
            m.training = flag
    return torch.cat(acts).mean(0), torch.cat(drops).mean(0)


def _artifact_png(colour: Tensor, alpha: Tensor) -> bytes:
    """LA (grey) or RGBA PNG of a C×h×w colour in [0, 1] with a 0/1 alpha."""
    from PIL import Image

    c = np.rint(colour.clamp(0, 1).numpy() * 255).astype(np.uint8)
    a = (alpha.numpy() * 255).astype(np.uint8)
    image = Image.fromarray(np.dstack([c[0], a]), "LA") if c.shape[0] == 1 else \
        Image.fromarray(np.dstack([c.transpose(1, 2, 0), a]), "RGBA")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _mask_png(mask: Tensor) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((mask.numpy() > 0).astype(np.uint8) * 255, "L").save(buffer, format="PNG")
    return buffer.getvalue()


def _one(model, data, result: DiscoverResult, cls: int, cid: int, layer: str, value_range) -> dict:
    """Region, artifact patch and region channels of one cluster."""
    entry = result.for_class(cls)
    cluster = entry.cluster(cid)
    members = torch.as_tensor(cluster.members, dtype=torch.long)
    region, rest = cluster_region(entry, cluster, data, result)  # rest: the items that do not look at the region
    fill = data.x[rest].mean(0) if len(rest) else torch.zeros(data.shape)
    activation, drop = region_channels(model, data.x[members], region, fill, layer)
    supplied = torch.where(activation > 0, drop / activation.clamp_min(1e-12), torch.zeros_like(drop))
    rows, cols = torch.nonzero(region, as_tuple=True)
    r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    low, high = (float(v) for v in value_range)
    colour = (data.x[members][:, :, r0:r1, c0:c1].mean(0) - low) / (high - low)
    return {"entry": entry, "cluster": cluster, "members": members, "region": region, "origin": (r0, c0),
            "box": [r0, c0, r1, c1], "png": _artifact_png(colour, region[r0:r1, c0:c1].float()),
            "channels": int(activation.numel()),
            "no": [int(j) for j in torch.nonzero((drop > 0) & (supplied >= NEURON_SHARE)).flatten()]}


def export_clusters(model: nn.Module, data, result: DiscoverResult, picks, out_dir, value_range=(0.0, 1.0),
                    layer: str | None = None, final_dir=None) -> dict:
    """Write the repair inputs of the clusters `picks` ([(class, cluster id), …]) into the new folder `out_dir`
    (atomically) and return export.json's content. Every file is read back with the reader its command uses before
    the folder appears. `final_dir`: where the folder will end up when `out_dir` is itself being staged (the
    artifact specs name that path)."""
    out_dir = Path(out_dir)
    final_dir = Path(final_dir or out_dir).resolve()
    picks = list(dict.fromkeys((int(c), int(k)) for c, k in picks))
    if not picks:
        raise ModelfixError("--export names no cluster")
    explained = torch.zeros(len(data), dtype=torch.bool)
    is_member = torch.zeros(len(data), dtype=torch.bool)
    for cls, cid in picks:
        explained[result.for_class(cls).items] = True
        is_member[result.for_class(cls).cluster(cid).members] = True
    for entry in result.classes:
        explained[entry.items] = True
    layer = layer or default_feedback_layer(model)
    parts = [_one(model, data, result, cls, cid, layer, value_range) for cls, cid in picks]
    # the clean pool: every item that is not a member, except unexplained items of an exported class (they may
    # carry the artifact as well)
    exported = torch.zeros(len(data), dtype=torch.bool)
    for cls, _ in picks:
        exported |= data.y == cls
    clean = ~is_member & (~exported | explained)
    mask = torch.zeros_like(data.mask)
    for part in parts:
        mask[part["members"], 0] = part["region"].float()
    ids = sample_ids(data)
    members = [i for part in parts for i in part["cluster"].members]
    pruned = sorted({j for part in parts for j in part["no"]})
    folder_data = data.info.get("source") == "folder" and isinstance(data.info.get("files"), list)
    label = ", ".join(f"{p['entry'].name}:{p['cluster'].id}" for p in parts)
    doc = {"clusters": [], "members": len(members), "layer": layer, "neurons_no": pruned,
           "clean_items": int(clean.sum()), "files": {}}
    with staged_folder(out_dir) as staging:
        save_bundle(data.with_(mask=mask, has_mask=is_member.clone()), staging / "masks.npz")
        check = masks_from_bundle(data, staging / "masks.npz")
        if not torch.equal(check.has_mask, is_member) or not torch.equal(check.mask, mask):
            raise ModelfixError("internal error: the exported masks.npz does not read back")  # never expected
        doc["files"]["masks_bundle"] = "masks.npz"
        if folder_data:  # mirror DIR/<class>/<file> so `--masks OUT/masks` finds each member's mask by its stem
            for part in parts:
                png = _mask_png(part["region"])
                for i in part["cluster"].members:
                    rel = Path(data.info["files"][i])
                    write_bytes_atomic(staging / "masks" / rel.parent / f"{rel.stem}.png", png)
            doc["files"]["masks_folder"] = "masks"
        for part in parts:
            name = f"artifact-{part['entry'].cls}-{part['cluster'].id}.png"
            write_bytes_atomic(staging / name, part["png"])
            (r0, c0) = part["origin"]
            _, pasted = parse_artifact(f"image:{staging / name}@{r0}:{c0}").apply(data.x[:1])
            if not torch.equal(pasted[0, 0] > 0, part["region"]):
                raise ModelfixError("internal error: an exported artifact does not cover its region")  # never expected
            doc["clusters"].append({"class": part["entry"].cls, "name": part["entry"].name,
                                    "cluster": part["cluster"].id,
                                    "score": part["cluster"].score.score, "members": part["cluster"].size,
                                    "region": {"pixels": int(part["region"].sum()), "box": part["box"]},
                                    "neurons_no": part["no"], "artifact": f"image:{final_dir / name}@{r0}:{c0}"})
        doc["artifact"] = doc["clusters"][0]["artifact"]
        note = {"discovered": f"modelfix discover, clusters {label}"}
        write_sample_feedback(staging / "feedback" / "samples.csv", SampleFeedback({ids[i]: "no" for i in members}),
                              note, ids=[ids[i] for i in members])
        verdicts = read_sample_feedback(staging / "feedback" / "samples.csv").for_data(data)
        if [verdicts[i] for i in members] != ["no"] * len(members):
            raise ModelfixError("internal error: samples.csv does not read back")  # never expected
        channels = parts[0]["channels"]
        write_neuron_feedback(staging / "feedback" / "neurons.csv",
                              NeuronFeedback(layer, {j: "no" for j in pruned}, channels), note)
        if read_neuron_feedback(staging / "feedback" / "neurons.csv", channels, layer).prune != pruned:
            raise ModelfixError("internal error: neurons.csv does not read back")  # never expected
        save_bundle(data.subset(torch.nonzero(clean).flatten()), staging / "clean.npz")
        doc["files"].update(samples="feedback/samples.csv", neurons="feedback/neurons.csv", clean="clean.npz")
        write_text_atomic(staging / "export.json", json.dumps(json_safe(doc), indent=2) + "\n")
    return doc
