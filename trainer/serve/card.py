"""The Hub model card of an elastic checkpoint, built with ``huggingface_hub.ModelCard`` / ``ModelCardData``.

Metadata (library, tags, base model, datasets) is a ``ModelCardData``; the measured quality of every cell is
a list of ``EvalResult``s, from which huggingface_hub writes the ``model-index``. The body lists the cells
the model serves (float and binary) with their nDCG@10, bytes per vector and speed, marking the Pareto
frontier, then usage, the training loss with its settings and the citations. As in sentence-transformers'
cards, the loss section and the citations come from the loss itself (``get_config_dict()`` and
``citation``, recorded in the manifest at training time, ``trainer.manifest``).
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from trainer.grid import FLOAT_BITS, Cell

MAIN_METRIC = "ndcg_at_10"
TAGS = [
    "sentence-transformers",
    "sentence-similarity",
    "feature-extraction",
    "matryoshka",
    "2d-matryoshka",
    "binary-embeddings",
    "elastic-embeddings",
]
WISE_FT_CITATION = """@inproceedings{wortsman2022wiseft,
  title     = {Robust fine-tuning of zero-shot models},
  author    = {Wortsman, Mitchell and Ilharco, Gabriel and Kim, Jong Wook and Li, Mike and Kornblith, Simon and
               Roelofs, Rebecca and Gontijo Lopes, Raphael and Hajishirzi, Hannaneh and Farhadi, Ali and
               Namkoong, Hongseok and Schmidt, Ludwig},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition},
  year      = {2022}
}"""
SBERT_CITATION = """@inproceedings{reimers-2019-sentence-bert,
  title     = {Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks},
  author    = {Reimers, Nils and Gurevych, Iryna},
  booktitle = {Proceedings of the 2019 Conference on Empirical Methods in Natural Language Processing},
  year      = {2019},
  url       = {https://arxiv.org/abs/1908.10084}
}"""
PLOTS = {
    "pareto.png": "nDCG@10 against bytes per vector; float and code cells as separate series, Pareto frontier marked",
    "pareto-latency.png": "nDCG@10 against milliseconds per query; Pareto frontier marked",
}


def _hub_datasets(manifest: dict[str, Any]) -> list[str]:
    sources = manifest.get("recipe", {}).get("data", {}).get("train", [])
    return sorted({s["hub"] for s in sources if s.get("hub")})


def eval_results(grid: dict[str, Any]) -> list[EvalResult]:
    """One nDCG@10 ``EvalResult`` per task and cell (huggingface_hub groups them by task in the model-index)."""
    return [
        EvalResult(
            task_type="Retrieval",
            dataset_type=task["name"],
            dataset_name=f"MTEB {task['name']}",
            dataset_split=task["split"],
            dataset_config="default",
            metric_type=MAIN_METRIC,
            metric_name=f"nDCG@10 ({entry['cell']})",
            metric_value=entry["scores"][task["name"]][MAIN_METRIC],
        )
        for task in grid["tasks"]
        for entry in grid["cells"]
    ]


def card_data(repo_id: str, manifest: dict[str, Any], grid: dict[str, Any] | None, license: str) -> ModelCardData:
    loss_tag = [f"loss:{manifest['loss_class']}"] if manifest.get("loss_class") else []
    return ModelCardData(
        library_name="sentence-transformers",
        pipeline_tag="sentence-similarity",
        tags=TAGS + loss_tag,
        base_model=manifest["base_model"],
        license=license,
        datasets=_hub_datasets(manifest) or None,
        model_name=repo_id.split("/")[-1] if grid else None,
        eval_results=eval_results(grid) if grid else None,
    )


def servable_table(cells: list[dict[str, Any]], tasks: list[str]) -> str:
    """One row per servable cell, float first then by bits and size: quality per task, bytes, speed, frontier."""
    lines = [
        "| cell | bits | bytes/vector | " + " | ".join(f"nDCG@10 {t}" for t in tasks) + " | ms/query | queries/s | "
        "Pareto (bytes) | Pareto (ms) |",
        "|---|---|---|" + "---|" * len(tasks) + "---|---|---|---|",
    ]
    for entry in sorted(cells, key=lambda e: (-e["bits"], e["bytes_per_vector"], e["cell"])):
        scores = " | ".join(f"{entry[MAIN_METRIC][t]:.4f}" for t in tasks)
        ms = f"{entry['ms_per_query']:.2f}" if entry.get("ms_per_query") is not None else "-"
        qps = f"{entry['queries_per_s']:.0f}" if entry.get("queries_per_s") is not None else "-"
        pareto = entry.get("pareto", {})
        marks = " | ".join("★" if pareto.get(kind) else "" for kind in ("bytes", "latency"))
        bits = "float32" if entry["bits"] == FLOAT_BITS else str(entry["bits"])
        lines.append(
            f"| {entry['cell']} | {bits} | {entry['bytes_per_vector']:g} | {scores} | {ms} | {qps} | {marks} |"
        )
    return "\n".join(lines)


def _usage(repo_id: str, small: Cell) -> str:
    return f"""```python
from sentence_transformers import SentenceTransformer

# The full float model: a plain sentence-transformers model.
model = SentenceTransformer("{repo_id}")
embeddings = model.encode(["What is a 2D Matryoshka embedding?"])

# Any smaller cell: only the first {small.layers} layers run, {small.dim} dims, {small.bits} bits per dim.
from trainer.serve.model import load  # pip install elastic-embeddings

codes = load("{repo_id}").at("{small}").encode(["What is a 2D Matryoshka embedding?"])
```

Export one cell as a standalone sentence-transformers model (layers removed, `truncate_dim` set):

```bash
python -m trainer export {repo_id} --cell {small} --out {small}
```"""


def _small_cell(manifest: dict[str, Any], servable: list[dict[str, Any]]) -> Cell:
    if servable:
        return min((Cell.parse(e["cell"]) for e in servable), key=lambda c: (c.bytes_per_vector, -c.layers))
    code_bits = [b for b in manifest.get("bits", []) if b != FLOAT_BITS]
    first = Cell.parse(manifest["cells"][0])
    return first.with_bits(min(code_bits)) if code_bits else first


def _citations(manifest: dict[str, Any]) -> str:
    """BibTeX of sentence-transformers, of the training loss (its ``citation``) and of WiSE-FT when the recipe
    merged the weights, as sentence-transformers' cards list them."""
    parts = ["### BibTeX", "#### Sentence Transformers", f"```bibtex\n{SBERT_CITATION}\n```"]
    if manifest.get("citation"):
        parts += [f"#### {manifest.get('loss_class', 'Training loss')}", f"```bibtex\n{manifest['citation']}\n```"]
    if (manifest.get("recipe") or {}).get("wise_ft"):
        parts += ["#### WiSE-FT", f"```bibtex\n{WISE_FT_CITATION}\n```"]
    return "\n\n".join(parts)


def render_card(
    repo_id: str,
    manifest: dict[str, Any],
    grid: dict[str, Any] | None,
    plots: list[str] | None = None,
    license: str = "apache-2.0",
) -> str:
    """The README.md text. ``manifest["servable_cells"]`` (``trainer.serve.publish.servable_cells``) are the
    evaluated cells the checkpoint serves; ``plots`` the names of the staged plot files."""
    servable = manifest.get("servable_cells", [])
    bits = ", ".join(
        "float32" if b == FLOAT_BITS else f"{b}-bit" for b in sorted(manifest.get("bits", []), reverse=True)
    )
    parts = [
        f"# {repo_id.split('/')[-1]}",
        f"An elastic text-embedding model fine-tuned from `{manifest['base_model']}` with 2D Matryoshka "
        f"({manifest['loss']}) losses: every sub-model of the first L of {manifest['num_layers']} layers and the "
        f"first D of {manifest['embedding_dim']} dims is usable on its own, at {bits}. Trained cells: "
        + ", ".join(f"`{c}`" for c in manifest["cells"])
        + ".",
    ]
    if grid and servable:
        tasks = [t["name"] for t in grid["tasks"]]
        splits = ", ".join(f"{t['name']} ({t['split']})" for t in grid["tasks"])
        machine = f" Speed measured on {grid['machine']}" if grid.get("machine") else ""
        parts += [
            "## Servable cells",
            f"The cells this model serves (`load(...).at(cell)`, `trainer export`), with nDCG@10 from mteb on "
            f"{splits}, bytes per vector and speed.{machine}: ms/query is encoding one query with early exit "
            "(amortised over a batch) plus searching the task's corpus. ★ marks the Pareto frontier: no other "
            "cell is both smaller (or faster) and better.",
            servable_table(servable, tasks),
        ]
    for name in plots or []:
        parts.append(f"![{PLOTS.get(name, name)}]({name})")
    parts += ["## Usage", _usage(repo_id, _small_cell(manifest, servable))]
    if manifest.get("loss_config"):
        parts += [
            "## Training loss",
            f"`{manifest.get('loss_class', 'loss')}` with these parameters:",
            f"```json\n{json.dumps(manifest['loss_config'], indent=2)}\n```",
        ]
    recipe = yaml.safe_dump(manifest.get("recipe", {}), sort_keys=False)
    parts += ["## Training recipe", f"```yaml\n{recipe}```", "## Citation", _citations(manifest)]
    data = card_data(repo_id, manifest, grid, license)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(parts) + "\n"))
