"""Binary codes of frozen all-MiniLM-L6-v2 on cranfield: untrained heads are the sign baseline (and 2 bits beat it);
head-only learning, checked on held-out train queries (``trainer.train.holdout``), never ends below the sign bits
at any seed and improves on them on average over 3 seeds; its 2-bit codes beat its 1-bit ones on average over the 3
seeds but stay below the untrained residual sign quantiser's (BENCHMARKS.md section 6). The per-seed values depend
on the machine's floating-point kernels (seed 42's learned 2 bits are 0.3718 on the AMD machine and 0.3358, below
its 0.3395 at 1 bit, on the Intel one), so the 2-bit claim, like the improvement, is on the mean of 3 seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import MINILM, requires_shared_data
from trainer.beir import load_split
from trainer.binary.codes import code_scores, sign_codes
from trainer.binary.heads import BinaryHeads
from trainer.cell_vectors import cell_vector
from trainer.grid import Cell, Grid
from trainer.train.head_only import cached_layer_embeddings, fit_heads
from trainer.train.recipe import BinaryConfig


def ndcg_at_10(scores: np.ndarray, query_ids: list[str], doc_ids: list[str], qrels: dict[str, dict[str, int]]):
    """Mean nDCG@10 with graded gains (trec_eval's ndcg_cut_10, via pytrec_eval)."""
    import pytrec_eval

    top = np.argsort(-scores, axis=1)[:, :100]
    run = {q: {doc_ids[j]: float(scores[i, j]) for j in top[i]} for i, q in enumerate(query_ids)}
    evaluator = pytrec_eval.RelevanceEvaluator({q: qrels[q] for q in query_ids}, {"ndcg_cut.10"})
    return float(np.mean([m["ndcg_cut_10"] for m in evaluator.evaluate(run).values()]))


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: on a shared 2-core machine, OpenMP's spinning threads make the small
    head matmuls ~10x slower under load; restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_learned_one_bit_codes_beat_sign_binarization(request, tmp_path_factory):
    from sentence_transformers import SentenceTransformer

    folder = requires_shared_data("cranfield")
    train, test = load_split(folder, "train"), load_split(folder, "test")
    doc_ids, test_ids, train_ids = list(test.corpus), list(test.queries), list(train.queries)
    texts = [test.corpus[d] for d in doc_ids] + [train.queries[q] for q in train_ids]
    texts += [test.queries[q] for q in test_ids]
    cache = getattr(request.config, "cache", None)
    cache_dir = cache.mkdir("minilm-cranfield") if cache else tmp_path_factory.mktemp("minilm-cranfield")
    model = SentenceTransformer(MINILM, device="cpu")
    layers = cached_layer_embeddings(model, texts, (6,), cache_dir)[6]

    cell = Cell(6, 384)
    n_docs, n_train = len(doc_ids), len(train_ids)
    docs = cell_vector({6: layers[:n_docs]}, cell)
    queries = cell_vector({6: layers[n_docs + n_train :]}, cell)
    row = {d: i for i, d in enumerate(doc_ids)}
    pairs = torch.tensor(
        [(n_docs + i, row[d]) for i, q in enumerate(train_ids) for d, rel in train.qrels[q].items() if rel > 0]
    )

    def score(codes_of) -> float:
        return ndcg_at_10(code_scores(codes_of(queries), codes_of(docs)), test_ids, doc_ids, test.qrels)

    float_ndcg = ndcg_at_10((queries @ docs.T).numpy(), test_ids, doc_ids, test.qrels)
    sign = score(lambda x: sign_codes(x.numpy()))
    untrained_heads = BinaryHeads([384], [1, 2]).eval()
    untrained = {bits: score(lambda x, b=bits: untrained_heads.encode(x, cell.with_bits(b))) for bits in (1, 2)}
    # the heads learn from the corpus and the TRAIN queries only (test queries are never seen); 113 test
    # queries make one seed's difference noise (seeds 42/43/44 give learned 1-bit 0.336/0.319/0.316), so the
    # claim of improvement is on the mean over 3 seeds
    learned = {1: [], 2: []}
    for seed in (42, 43, 44):
        config = BinaryConfig(bits=[1, 2], mode="head-only", steps=300, batch_size=256, seed=seed)
        heads = fit_heads({6: layers[: n_docs + n_train]}, Grid((cell,), (1, 2)), config, pairs)
        for bits in (1, 2):
            learned[bits].append(score(lambda x, b=bits, h=heads: h.encode(x, cell.with_bits(b))))
    print(f"nDCG@10 L6-D384: float {float_ndcg:.4f}  sign {sign:.4f}  untrained {untrained}  learned {learned}")
    assert float_ndcg == pytest.approx(0.372, abs=0.01)  # the data README's reference figure
    assert untrained[1] == sign  # untrained heads start exactly at the sign baseline ...
    assert untrained[2] > untrained[1] + 0.02  # ... and their second bit plane already helps
    assert min(learned[1]) >= sign  # the held-out check keeps the learned 1 bit only where it beats sign bits
    assert np.mean(learned[1]) > sign + 0.01  # in-domain, head-only learning improves on it (on average)
    assert np.mean(learned[2]) > np.mean(learned[1])  # the second plane helps (on average over 3 seeds)
