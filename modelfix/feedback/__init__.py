"""CRAYON feedback: yes/no/maybe files on neurons and samples, neuron galleries, saliency folders and simulated
verdicts from masks (methods_posthoc.md §6)."""

from modelfix.feedback.files import (
    NeuronFeedback,
    SampleFeedback,
    declared_layer,
    parse_verdict,
    read_header_comments,
    read_neuron_feedback,
    read_sample_feedback,
    sample_ids,
    write_neuron_feedback,
    write_neuron_template,
    write_sample_feedback,
    write_sample_template,
)
from modelfix.feedback.gallery import (
    TopK,
    default_feedback_layer,
    default_patch,
    patch_box,
    resolve_layer,
    top_activations,
    write_gallery,
)
from modelfix.feedback.saliency_files import read_saliency, write_saliency
from modelfix.feedback.simulate import attention_share, corner_region, simulate_neurons, simulate_samples

__all__ = [
    "NeuronFeedback", "SampleFeedback", "TopK", "attention_share", "corner_region", "declared_layer", "default_feedback_layer", "default_patch",
    "parse_verdict", "patch_box", "read_header_comments", "read_neuron_feedback", "read_sample_feedback",
    "read_saliency", "resolve_layer", "sample_ids", "simulate_neurons", "simulate_samples", "top_activations",
    "write_gallery", "write_neuron_feedback", "write_neuron_template", "write_sample_feedback",
    "write_sample_template", "write_saliency",
]
