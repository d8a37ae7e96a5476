"""Shared plumbing of vitlab's staged (hierarchical) token models: pooling, classifier, intermediates, pruning.

A model using `StagedTokenModel` has `stages` (each returning `(tokens, (H, W))` and having `num_prefix_tokens`),
`norm`, `head`, `head_drop`, `global_pool`, `num_features`, `feature_info` and `num_prefix_tokens`, and sets the
class attributes `family_name`, `stem_pattern` and `token_pool_hint`.
"""
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import ClassifierHead
from timm.models._features import feature_take_indices

__all__ = ["GridSequenceMixin", "StagedTokenModel", "tokens_to_map"]


def tokens_to_map(x: torch.Tensor, hw: tuple[int, int], num_prefix: int) -> torch.Tensor:
    """(B, prefix + H*W, C) -> (B, C, H, W) without a copy: a channels-last view, which the convs keep channels-last,
    so that their outputs flatten back to tokens without a copy either."""
    B, _, C = x.shape
    return x[:, num_prefix:].reshape(B, *hw, C).permute(0, 3, 1, 2)


class LinearHeadMixin:
    """`get_classifier` / `reset_classifier` for models whose head is one `nn.Linear` (`self.head`, on
    `self.head_hidden_size` features pooled as `self.global_pool` says); `pool_types` lists the pools it has."""

    pool_types: tuple[str, ...] = ("avg", "")

    def _check_pool(self, global_pool: str) -> None:
        if global_pool not in self.pool_types:
            raise ValueError(f"{type(self).__name__}: global_pool={global_pool!r}; expected one of "
                             f"{', '.join(map(repr, self.pool_types))}")

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            self._check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        like = next(self.parameters())  # the new head lives where the model does
        self.head = (nn.Linear(self.head_hidden_size, num_classes, device=like.device, dtype=like.dtype)
                     if num_classes > 0 else nn.Identity())



class GridSequenceMixin(LinearHeadMixin):
    """timm's model API for isotropic models whose blocks run on one token grid (SpectFormer, Hyena N-D): the model
    gives `_tokens(x) -> (tokens (B, N, C), (H, W))` and `_run_block(block, x, grid)`, and has `blocks`, `norm`,
    `head_drop`, `head` and `global_pool` ("avg" or "")."""

    def _run_block(self, block: nn.Module, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        return block(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Block outputs at `indices` (last n if int, all if None), as (B, C, H, W) or tokens (B, N, C) for NLC."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, grid = self._tokens(x)
        intermediates = []
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        for i, block in enumerate(blocks):
            x = self._run_block(block, x, grid)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        if output_fmt == "NCHW":
            intermediates = [y.reshape(y.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, grid = self._tokens(x)
        for block in self.blocks:
            x = self._run_block(block, x, grid)
        return self.norm(x)  # (B, N, C)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

class StagedTokenModel(LinearHeadMixin, nn.Module):
    """Methods timm expects of a classifier / backbone, shared by the staged token models (CvT, PVT)."""

    family_name: str = ""
    stem_pattern: str = r"^stages\.0\.patch_embed"
    token_pool_hint: str = "a class token"

    pool_types = ("token", "avg", "")

    def _check_pool(self, global_pool: str) -> None:
        super()._check_pool(global_pool)
        if global_pool == "token" and not self.num_prefix_tokens:
            raise ValueError(f"global_pool='token' needs {self.token_pool_hint}")

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"stages.{i}.cls_token" for i, s in enumerate(self.stages) if s.cls_token is not None}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=self.stem_pattern,
                    blocks=r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.blocks\.(\d+)", None),
                                                             (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, list[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[list[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
        """Stage outputs as NCHW maps (class token dropped); `norm` applies the final LayerNorm to the last stage's.

        Returns the intermediates, or (what `forward_features` returns, intermediates).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: {self.family_name} intermediates are 'NCHW' only")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        for i, stage in enumerate(stages):
            tokens, hw = stage(x)
            x = tokens_to_map(tokens, hw, stage.num_prefix_tokens)
            if i in take_indices:
                last = i == len(self.stages) - 1
                intermediates.append(tokens_to_map(self.norm(tokens), hw, stage.num_prefix_tokens)
                                     if norm and last else x)
        if intermediates_only:
            return intermediates
        return (self.norm(tokens) if len(stages) == len(self.stages) else tokens), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, list[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        if max_index < len(self.stages) - 1:
            self.stages = self.stages[:max_index + 1]
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.num_prefix_tokens = self.stages[-1].num_prefix_tokens
            prune_norm = prune_head = True  # the norm and head were sized for the last stage
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages[:-1]:
            tokens, hw = stage(x)
            x = tokens_to_map(tokens, hw, stage.num_prefix_tokens)
        tokens, _ = self.stages[-1](x)
        return self.norm(tokens)  # (B, prefix + H*W, C)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class NHWCStageModel(nn.Module):
    """Classifier API shared by hierarchical models whose stages take and return (B, H, W, C) tensors (CrossFormer,
    DiNAT): `self.patch_embed`, `self.stages`, `self.norm` (final, last stage's width), `self.head` (timm
    `ClassifierHead`, NHWC input), `self.feature_info`. `_embed` (patch embedding, plus dropout where the model has
    it) is the only hook."""

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (NCHW) at `indices` (last n if int, all if None); `norm` applies the final norm to the last stage's."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        intermediates = []
        x = self._embed(x)
        for i, stage in enumerate(stages):
            x = stage(x)  # (B, H, W, C)
            if i in take_indices:
                y = self.norm(x) if norm and i == last else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        if len(stages) - 1 == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        if prune_norm or max_index < len(self.stages) - 1:
            self.norm = nn.Identity()  # sized for the last stage only
        if max_index < len(self.stages) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.head = ClassifierHead(self.num_features, 0, "avg", input_fmt="NHWC")
        self.stages = self.stages[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stages(self._embed(x)))  # (B, H/32, W/32, C)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
