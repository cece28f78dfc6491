"""2D Matryoshka contrastive loss over the (layer, dim) cells of a step, with KL alignment to the full cell."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from trainer.train.losses.elastic import CellBatch, group_mean
from trainer.train.losses.infonce import InfoNCELoss


class Matryoshka2dLoss(nn.Module):
    """InfoNCE at every cell of the step plus KL alignment of each cell to the full cell, in weighted groups.

    For each cell c with scaled scores ``S_c`` (anchors x candidates, see ``InfoNCELoss``) the objective is

        L = w_full   * InfoNCE(S_full)
          + w_dims   * mean_{d < D} InfoNCE(S_{L,d})           (every smaller dim of the last layer: Matryoshka)
          + w_layers * mean_{l < L} InfoNCE(S_{l,d})           (the earlier-layer cells of the step)
          + w_kl     * mean_{c != full} KL(P_full || P_c),     P_c = softmax(S_c / T), S_full detached

    (with ``kl_last_layer=False`` the KL mean runs over the earlier-layer cells only)

    (Kusupati et al. 2022, Matryoshka Representation Learning; Zhuang et al. 2024, Starbucks, whose KL aligns
    each cell to the full model; Li et al. 2024, 2DMSE). Each group is a *mean*, so adding a cell or a dim to
    the grid never re-weights the other groups: the shares of the objective are the four weights. A batch
    with a single text column (label-free data) has no candidates and gets no term from this loss.
    Components are logged as ``loss/L4-D128`` and ``kl/L4-D128``, each already scaled by its group's
    ``weight / size``, so the logged components sum to the objective.
    """

    citation = """@article{zhuang2024starbucks,
  title   = {Starbucks: Improved Training for 2D Matryoshka Embeddings},
  author  = {Zhuang, Shengyao and Wang, Shuai and Koopman, Bevan and Zuccon, Guido},
  journal = {arXiv preprint arXiv:2410.13230},
  year    = {2024}
}
@article{li2024twodmse,
  title   = {2D Matryoshka Sentence Embeddings},
  author  = {Li, Xianming and Li, Zongxi and Li, Jing and Xie, Haoran and Li, Qing},
  journal = {arXiv preprint arXiv:2402.14776},
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

    def __init__(
        self,
        contrastive: InfoNCELoss,
        full_weight: float = 1.0,
        dims_weight: float = 1.0,
        layers_weight: float = 1.0,
        kl_weight: float = 1.0,
        kl_temperature: float = 1.0,
        kl_last_layer: bool = True,
    ) -> None:
        super().__init__()
        self.contrastive = contrastive
        self.full_weight, self.dims_weight, self.layers_weight = full_weight, dims_weight, layers_weight
        self.kl_weight, self.kl_temperature, self.kl_last_layer = kl_weight, kl_temperature, kl_last_layer

    def forward(self, batch: CellBatch) -> dict[str, Tensor]:
        if len(batch.layer_embeddings) < 2:  # a label-free batch of one text column: nothing to contrast
            return {}
        full = batch.full
        pools = {cell: self.contrastive.pool(columns[1:]) for cell, columns in batch.embeddings.items()}
        losses = {cell: self.contrastive(cols[0], cols[1:], pools[cell]) for cell, cols in batch.embeddings.items()}
        dims = {f"loss/{c.name2d}": v for c, v in losses.items() if c.layers == full.layers and c != full}
        layers = {f"loss/{c.name2d}": v for c, v in losses.items() if c.layers < full.layers}
        components = {
            **group_mean({f"loss/{full.name2d}": losses[full]}, self.full_weight),
            **group_mean(dims, self.dims_weight),
            **group_mean(layers, self.layers_weight),
        }
        if self.kl_weight:
            target = batch.embeddings[full][0]
            kl = {
                f"kl/{cell.name2d}": self.contrastive.kl(
                    target, pools[full][0], columns[0], pools[cell][0], self.kl_temperature
                )
                for cell, columns in batch.embeddings.items()
                if cell != full and (self.kl_last_layer or cell.layers < full.layers)
            }
            components.update(group_mean(kl, self.kl_weight))
        return components

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "scale": self.contrastive.scale,
            "symmetric": self.contrastive.symmetric,
            "full_weight": self.full_weight,
            "dims_weight": self.dims_weight,
            "layers_weight": self.layers_weight,
            "kl_weight": self.kl_weight,
            "kl_temperature": self.kl_temperature,
            "kl_last_layer": self.kl_last_layer,
        }
