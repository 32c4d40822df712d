"""CRAYON on the command line: `feedback gallery|saliency|simulate` (what a person judges, or the papers' simulated
verdicts) and `prune-crayon` (zero the "no" channels, refit the last layer). `finetune --method crayon-attention
--feedback FILE` lives with the other fine-tunes (cli_train). No algorithms live here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..app.outputs import OutputPlan
from ..app.resolve import check_fits, device_name, load_checkpoint, load_dataset
from ..errors import ModelfixError
from .base import app, finish_repair, handles_errors, out, say
from .config import recorded_invocation
from .options import (data_options, ArtifactOpt, DataRootOpt, DeviceOpt, EvalDataOpt, JsonOpt, MasksOpt, OverwriteOpt, SeedOpt,
                     StrictOpt, checkpoint_options, repair_job_common)

feedback_app = typer.Typer(help="Yes/no feedback for CRAYON: neuron galleries, saliency maps, simulated verdicts.",
                           no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")

ModelArg = Annotated[Path, typer.Argument(metavar="MODEL", help="A .safetensors or .pt/.pth checkpoint.")]
DataOpt = Annotated[str, typer.Option("--data", help="A folder, a .npz/.safetensors bundle or SCENARIO[:SPLIT] (the training data).", rich_help_panel="Data")]
NeuronLayerOpt = Annotated[Optional[str], typer.Option("--layer", help="Layer whose channels are judged (default: the input of the last linear layer).")]
CamLayerOpt = Annotated[Optional[str], typer.Option("--layer", help="Grad-CAM layer (default: the last conv block; 'input' or nets without conv: |input gradient|).")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Top activating image patches per neuron.")]
PatchOpt = Annotated[Optional[int], typer.Option("--patch", help="Patch side in pixels (default: 2 × the layer's stride; whole image for non-spatial layers).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", rich_help_panel="Runtime")]


def _model_and_data(model_path, data, masks, data_root, seed, device, checkpoint: dict, reading: dict):
    model, card = load_checkpoint(model_path, device=device_name(device), **checkpoint)
    dataset = load_dataset(data, data_root, seed, masks, card=card, reading=reading)
    check_fits(dataset, card, data)
    return model, card, dataset


def _maps(model, dataset, layer, batch_size):
    from ..repair.guidance.crayon_attention import frozen_maps

    return frozen_maps(model, dataset, None if layer in (None, "auto") else layer, batch_size)


@feedback_app.command("gallery", epilog="Example: modelfix feedback gallery runs/cnn.safetensors --data data/train -o gallery/")
@handles_errors
@checkpoint_options
@data_options
def feedback_gallery(
    model_path: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="A new folder: neuron_NNNN.png, index.html, patches.json, neurons.csv.")],
    data: DataOpt = "decoy-digits:train",
    layer: NeuronLayerOpt = None,
    top_k: TopKOpt = 20,
    patch: PatchOpt = None,
    data_root: DataRootOpt = None,
    batch_size: BatchOpt = 256,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
    checkpoint: Optional[dict] = None,
    reading: Optional[dict] = None,
) -> None:
    """Per channel of a layer, the top-k activating image patches as one PNG grid, an index page and a blank
    neurons.csv to fill with yes (keep) / no (prune)."""
    from ..feedback import write_gallery

    if top_k < 1:
        raise ModelfixError(f"--top-k must be at least 1, not {top_k}")
    OutputPlan(folder=output, inputs=[model_path, data], folder_option="-o").check()
    model, _, dataset = _model_and_data(model_path, data, None, data_root, seed, device, checkpoint, reading)
    summary = write_gallery(model, dataset, output, layer=layer, k=top_k, patch=patch, batch_size=batch_size)
    if json_output:
        print(json.dumps(summary, default=str))
        return
    out.print(f"wrote {output}/index.html and a blank {output}/neurons.csv "
              f"({summary['channels']} neurons of layer {summary['layer']}, top {summary['k']})")


@feedback_app.command("saliency", epilog="Example: modelfix feedback saliency runs/cnn.safetensors --data data/train -o maps/")
@handles_errors
@checkpoint_options
@data_options
def feedback_saliency(
    model_path: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="A new folder: overlay PNGs, maps.safetensors, samples.csv.")],
    data: DataOpt = "decoy-digits:train",
    layer: CamLayerOpt = None,
    data_root: DataRootOpt = None,
    batch_size: BatchOpt = 256,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
    checkpoint: Optional[dict] = None,
    reading: Optional[dict] = None,
) -> None:
    """Per sample, the true-class Grad-CAM map (|input gradient| for nets without conv) as an overlay PNG, all maps
    in maps.safetensors, and a blank samples.csv to fill with yes / no / maybe."""
    from ..feedback import write_saliency

    OutputPlan(folder=output, inputs=[model_path, data], folder_option="-o").check()
    model, _, dataset = _model_and_data(model_path, data, None, data_root, seed, device, checkpoint, reading)
    summary = write_saliency(model, dataset, output, _maps(model, dataset, layer, batch_size))
    if json_output:
        print(json.dumps(summary, default=str))
        return
    out.print(f"wrote {len(dataset)} overlays, {output}/maps.safetensors and a blank {output}/samples.csv")


@feedback_app.command("simulate", epilog="Example: modelfix feedback simulate runs/mlp.safetensors --kind samples --data decoy-mnist:train -o samples.csv")
@handles_errors
@checkpoint_options
@data_options
def feedback_simulate(
    model_path: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="The filled feedback file (.csv).")],
    kind: Annotated[str, typer.Option("--kind", help="neurons (for prune-crayon) or samples (for crayon-attention).")] = "samples",
    data: DataOpt = "decoy-digits:train",
    masks: MasksOpt = None,
    layer: Annotated[Optional[str], typer.Option("--layer", help="neurons: the judged layer; samples: the Grad-CAM layer ('input': |input gradient|).")] = None,
    top_k: TopKOpt = 20,
    patch: PatchOpt = None,
    max_artifact_share: Annotated[float, typer.Option("--max-artifact-share", help="neurons: 'no' when more than this share of the top-k patches touch the artifact.")] = 0.5,
    no_above: Annotated[float, typer.Option("--no-above", help="samples: 'no' when more than this share of the map lies on the artifact region (paper: 0.2).")] = 0.2,
    region: Annotated[str, typer.Option("--region", help="Artifact region: mask (the data's masks) or corners (the four corner squares, the CRAYON paper's DecoyMNIST rule).")] = "mask",
    corner_size: Annotated[int, typer.Option("--corner-size", help="Side of each corner square for --region corners.")] = 4,
    overwrite: OverwriteOpt = False,
    data_root: DataRootOpt = None,
    batch_size: BatchOpt = 256,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
    checkpoint: Optional[dict] = None,
    reading: Optional[dict] = None,
) -> None:
    """The papers' automated verdicts from the artifact masks, so benchmarks and users without annotators can run
    CRAYON end to end. The thresholds go into the file's header."""
    from ..feedback import (corner_region, default_feedback_layer, sample_ids, simulate_neurons, simulate_samples,
                           top_activations, write_neuron_feedback, write_sample_feedback)

    if kind not in ("neurons", "samples"):
        raise ModelfixError(f"--kind must be neurons or samples, not '{kind}'")
    if region not in ("mask", "corners"):
        raise ModelfixError(f"--region must be mask or corners, not '{region}'")
    if output.suffix.lower() != ".csv":
        raise ModelfixError(f"-o {output}: simulated feedback is written as .csv")
    OutputPlan(files=[] if overwrite else [output], inputs=[model_path, data, masks], folder_option="-o").check()
    model, _, dataset = _model_and_data(model_path, data, masks, data_root, seed, device, checkpoint, reading)
    judged = corner_region(dataset, corner_size) if region == "corners" else dataset
    if kind == "neurons":
        if top_k < 1:
            raise ModelfixError(f"--top-k must be at least 1, not {top_k}")
        name = layer or default_feedback_layer(model)
        top = top_activations(model, dataset, name, k=top_k, batch_size=batch_size)
        if tuple(top.map_size) == (1, 1) and patch is None:
            raise ModelfixError(f"layer '{name}' is not spatial: every neuron's patch is the whole image, so the "
                                "artifact mask cannot tell neurons apart",
                                hint="simulate neuron feedback on a conv layer (--layer), e.g. of a CNN")
        feedback, settings = simulate_neurons(top, judged, patch=patch, max_artifact_share=max_artifact_share)
        settings = {"kind": "neurons", "layer": name, "data": data, "region": region, **settings}
        write_neuron_feedback(output, feedback, header_comment=settings)
        counts = {"no": len(feedback.prune), "yes": len(feedback.keep)}
    else:
        feedback, settings = simulate_samples(_maps(model, dataset, layer, batch_size), judged, no_above=no_above)
        settings = {"kind": "samples", "layer": layer or "auto", "data": data, "region": region, **settings}
        write_sample_feedback(output, feedback, header_comment=settings, ids=sample_ids(dataset))
        counts = feedback.counts(dataset)
    if json_output:
        print(json.dumps({"output": str(output), "counts": counts, "settings": settings}, default=str))
        return
    out.print(f"wrote {output}: " + ", ".join(f"{n} {verdict}" for verdict, n in counts.items()))


@app.command("prune-crayon", epilog="Example: modelfix prune-crayon runs/cnn.safetensors --feedback gallery/neurons.csv --data data/train -o runs/pruned.safetensors")
@handles_errors
@checkpoint_options
@data_options
def prune_crayon(
    model_path: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the pruned .safetensors (a stock checkpoint).", rich_help_panel="Output")],
    feedback: Annotated[Optional[Path], typer.Option("--feedback", help="Neuron verdicts: neurons.csv (layer,neuron,verdict), YAML {layer, prune, keep} or a JSON list (true = keep).")] = None,
    data: DataOpt = "decoy-digits:train",
    layer: NeuronLayerOpt = None,
    random: Annotated[bool, typer.Option("--random", help="Random Pruning baseline: prune as many random channels as the file's 'no' verdicts.")] = False,
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs of the last-layer fine-tune.", rich_help_panel="Training")] = 10,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate of the last-layer fine-tune.", rich_help_panel="Training")] = 1e-4,
    weight_decay: Annotated[float, typer.Option("--weight-decay", rich_help_panel="Training")] = 1e-4,
    batch_size: BatchOpt = 128,
    report: Annotated[Optional[Path], typer.Option("--report", help="Also write results.json, report.md and report.html (before/after metrics, heatmaps) into this folder.", rich_help_panel="Output")] = None,
    eval_data: EvalDataOpt = None,
    artifact: ArtifactOpt = None,
    overwrite: OverwriteOpt = False,
    strict: StrictOpt = False,
    data_root: DataRootOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
    checkpoint: Optional[dict] = None,
    reading: Optional[dict] = None,
) -> None:
    """CRAYON-PRUNING: zero the channels people answered "no", then fine-tune only the last linear layer."""
    from ..app.repair import RepairJob, repair_files

    if feedback is None:
        raise ModelfixError("prune-crayon needs --feedback FILE (neuron verdicts)",
                            hint="`modelfix feedback gallery` writes a blank neurons.csv; `feedback simulate --kind neurons` fills one")
    if epochs < 0:
        raise ModelfixError(f"--epochs must be >= 0, not {epochs}")
    settings = {"feedback": str(feedback), "layer": layer, "random": random, "epochs": epochs, "lr": lr,
                "weight_decay": weight_decay, "batch_size": batch_size, "seed": seed}
    job = RepairJob("prune-crayon", "crayon-pruning", output, model_path,
                    options={"layer": layer, "random": random, "epochs": epochs, "lr": lr, "weight_decay": weight_decay},
                    data=data, feedback=feedback, report=report, eval_data=eval_data, artifact=artifact, config=settings,
                    **repair_job_common(seed, device, batch_size, overwrite, data_root, checkpoint))
    job.invocation, job.reading = recorded_invocation(), reading or {}
    result, document = repair_files(job)
    trace = document["trace"]
    document["config"]["layer"] = trace["layer"]
    summary = f"pruned {trace['n_pruned']} of {trace['n_channels']} channels of {trace['layer']}"
    if "accuracy_before" in trace:  # absent when nothing was pruned (the model is written unchanged)
        summary += (f" ({'random' if random else 'the no verdicts'}); training accuracy "
                    f"{100 * trace['accuracy_before']:.2f} % → {100 * trace['accuracy_after']:.2f} %")
    finish_repair(document, output, report, json_output, strict, lambda: say(summary))
