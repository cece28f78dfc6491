"""The Hub model card of an elastic checkpoint: metadata, the grid per bit depth, usage, recipe, citations."""

from __future__ import annotations

from typing import Any

import yaml

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
CITATIONS = """\
@article{li2024twodmse,
  title   = {2D Matryoshka Sentence Embeddings},
  author  = {Li, Xianming and Li, Zongxi and Li, Jing and Xie, Haoran and Li, Qing},
  journal = {arXiv preprint arXiv:2402.14776},
  year    = {2024}
}
@article{zhuang2024starbucks,
  title   = {Starbucks: Improved Training for 2D Matryoshka Embeddings},
  author  = {Zhuang, Shengyao and Wang, Shuai and Koopman, Bevan and Zuccon, Guido},
  journal = {arXiv preprint arXiv:2410.13230},
  year    = {2024}
}
@inproceedings{gan2023bebr,
  title     = {Binary Embedding-based Retrieval at Tencent},
  author    = {Gan, Yukang and Ge, Yixiao and Zhou, Chang and Su, Shupeng and Xu, Zhouchuan and Xu, Xuyuan
               and Hui, Quanchao and Chen, Xiang and Wang, Yexin and Shan, Ying},
  booktitle = {Proceedings of the 29th ACM SIGKDD Conference on Knowledge Discovery and Data Mining},
  year      = {2023}
}
@article{zhang2024jasper,
  title   = {Jasper and Stella: distillation of SOTA embedding models},
  author  = {Zhang, Dun and Li, Jiacheng and Zeng, Ziyang and Wang, Fulong},
  journal = {arXiv preprint arXiv:2412.19048},
  year    = {2024}
}
@inproceedings{kusupati2022mrl,
  title     = {Matryoshka Representation Learning},
  author    = {Kusupati, Aditya and Bhatt, Gantavya and Rege, Aniket and Wallingford, Matthew and Sinha, Aditya
               and Ramanujan, Vivek and Howard-Snyder, William and Chen, Kaifeng and Kakade, Sham and Jain, Prateek
               and Farhadi, Ali},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2022}
}"""


def _hub_datasets(manifest: dict[str, Any]) -> list[str]:
    sources = manifest.get("recipe", {}).get("data", {}).get("train", [])
    return sorted({s["hub"] for s in sources if s.get("hub")})


def model_index(repo_id: str, grid: dict[str, Any]) -> list[dict[str, Any]]:
    """mteb results in the Hub's model-index form: one result per task, one nDCG@10 metric per cell."""
    results = []
    for task in grid["tasks"]:
        metrics = [
            {
                "type": MAIN_METRIC,
                "name": f"nDCG@10 ({entry['cell']})",
                "value": entry["scores"][task["name"]][MAIN_METRIC],
            }
            for entry in grid["cells"]
        ]
        results.append(
            {
                "task": {"type": "Retrieval"},
                "dataset": {
                    "type": task["name"],
                    "name": f"MTEB {task['name']}",
                    "split": task["split"],
                    "config": "default",
                },
                "metrics": metrics,
            }
        )
    return [{"name": repo_id.split("/")[-1], "results": results}]


def grid_tables(grid: dict[str, Any]) -> str:
    """One markdown table per bit depth: rows are cells (layers, dims), columns bytes/vector and each task."""
    tasks = [t["name"] for t in grid["tasks"]]
    lines = []
    for bits in sorted({e["bits"] for e in grid["cells"]}, reverse=True):
        label = "float32" if bits == FLOAT_BITS else f"{bits} bit{'s' if bits > 1 else ''} per dim"
        lines += [
            f"### {label}",
            "",
            "| cell | layers | dims | bytes/vector | " + " | ".join(tasks) + " |",
            "|---|---|---|---|" + "---|" * len(tasks),
        ]
        for entry in sorted((e for e in grid["cells"] if e["bits"] == bits), key=lambda e: (e["layers"], e["dim"])):
            scores = " | ".join(f"{entry['scores'][t][MAIN_METRIC]:.4f}" for t in tasks)
            lines.append(
                f"| {entry['cell']} | {entry['layers']} | {entry['dim']} | {entry['bytes_per_vector']:g} | {scores} |"
            )
        lines.append("")
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


def _small_cell(manifest: dict[str, Any], grid: dict[str, Any] | None) -> Cell:
    if grid and grid["cells"]:
        return min((Cell.parse(e["cell"]) for e in grid["cells"]), key=lambda c: (c.bytes_per_vector, -c.layers))
    code_bits = [b for b in manifest.get("bits", []) if b != FLOAT_BITS]
    first = Cell.parse(manifest["cells"][0])
    return first.with_bits(min(code_bits)) if code_bits else first


def render_card(
    repo_id: str, manifest: dict[str, Any], grid: dict[str, Any] | None, has_plot: bool, license: str = "apache-2.0"
) -> str:
    metadata: dict[str, Any] = {
        "library_name": "sentence-transformers",
        "pipeline_tag": "sentence-similarity",
        "tags": TAGS,
        "base_model": manifest["base_model"],
        "license": license,
    }
    if _hub_datasets(manifest):
        metadata["datasets"] = _hub_datasets(manifest)
    if grid:
        metadata["model-index"] = model_index(repo_id, grid)
    bits = ", ".join(
        "float32" if b == FLOAT_BITS else f"{b}-bit" for b in sorted(manifest.get("bits", []), reverse=True)
    )
    parts = [
        "---\n" + yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True) + "---",
        f"# {repo_id.split('/')[-1]}",
        f"An elastic text-embedding model fine-tuned from `{manifest['base_model']}` with 2D Matryoshka "
        f"({manifest['loss']}) losses: every sub-model of the first L of {manifest['num_layers']} layers and the "
        f"first D of {manifest['embedding_dim']} dims is usable on its own, at {bits}. Trained cells: "
        + ", ".join(f"`{c}`" for c in manifest["cells"])
        + ".",
    ]
    if grid:
        tasks = ", ".join(f"{t['name']} ({t['split']})" for t in grid["tasks"])
        parts += ["## Quality per cell", f"nDCG@10 from mteb on {tasks}.", grid_tables(grid)]
    if has_plot:
        parts.append("![nDCG@10 against bytes per vector, one line per layer count](pareto.png)")
    recipe = yaml.safe_dump(manifest.get("recipe", {}), sort_keys=False)
    parts += [
        "## Usage",
        _usage(repo_id, _small_cell(manifest, grid)),
        "## Training recipe",
        f"```yaml\n{recipe}```",
        "## Citation",
        f"```bibtex\n{CITATIONS}\n```",
    ]
    return "\n\n".join(parts) + "\n"
