"""The application layer: what every entry point (CLI, demo, benchmarks, examples) calls.

- `resolve`: a checkpoint into (model, card), a data spec into a dataset checked against the card;
- `outputs`: the one write path (outputs checked before any work, model + report committed together);
- `repair`: `repair(model, data, method, **options) -> RepairResult` and `repair_files(...)`, which records
  history and provenance once and writes the checkpoint and report once;
- `compare`: several methods on the same inputs, one table and one report;
- `config`: YAML configs for every command and `rerun`.
"""
