"""A Hugging Face causal LM as a `VectorLM` (pip install 'softar[hf]'): softAR's algorithm on any `transformers`
model saved with `save_pretrained`. Vectors enter through `inputs_embeds`, positions through `position_ids`, and
the model's own `past_key_values` is the KV cache. Nothing is fetched from a hub: the folder must hold the model."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from softar import SoftarError
from softar.data.tokenizer import HFTokenizer
from softar.hf_folder import hf_config, positions_of, transformers_module
from softar.model.interface import Hidden, Outputs


class HFVectorLM(nn.Module):
    """`model`: a `transformers` model with a causal LM head. E is its input embedding table; h_m is its last hidden
    state (after the final norm), which lives in R^m when the hidden size equals the embedding width."""

    vector_head = collapse_head = None  # a pretrained LM has neither of softAR's extra heads

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # transformers 5 renamed past_key_values to cache
        params = inspect.signature(model.base_model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        if self.E.shape[1] != model.config.hidden_size:
            raise SoftarError(f"{type(model).__name__}: embeddings of width {self.E.shape[1]} differ from its hidden "
                              f"size {model.config.hidden_size}; soft tokens need them equal")

    @classmethod
    def from_pretrained(cls, path: str | Path, what: str = "--hf", dtype: torch.dtype = torch.float32) -> HFVectorLM:
        """The folder's model with weights in `dtype`, in eval mode; errors name `what` gave the folder."""
        hf_config(path, what)
        if not any(Path(path).glob("*.safetensors")):
            raise SoftarError(f"{what}: {path} has no *.safetensors weights; only safetensors are loaded (nothing is "
                              "unpickled)")
        transformers = transformers_module()
        try:
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True, use_safetensors=True, trust_remote_code=False,
                output_loading_info=True, torch_dtype=dtype)
        except Exception as e:  # whatever transformers or safetensors raise on a broken folder
            raise SoftarError(f"{what}: cannot load a causal LM from {path}: "
                              f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}") from None
        fresh = sorted(set(info.get("missing_keys", ())) | {k[0] if isinstance(k, tuple) else k
                                                             for k in info.get("mismatched_keys", ())})
        if fresh:  # transformers would fill them with random weights
            raise SoftarError(f"{what}: {path} lacks weights the model needs ({', '.join(fresh[:3])}"
                              f"{' ...' if len(fresh) > 3 else ''}); refusing to run with random ones")
        return cls(model.eval())

    def add_tokens(self, tokenizer: HFTokenizer, size: int) -> None:
        """Rows for the tokens a reasoning task adds (`HFTokenizer.add_task_tokens`): the embedding and an untied LM
        head grow to `size` rows, and each added token's row starts at the mean of the rows of its name's pieces
        ("<thought>" from "thought"): deterministic, and the markers differ from the first step on (under LoRA they
        stay so, frozen)."""
        if size > self.E.shape[0]:
            self.model.resize_token_embeddings(size, mean_resizing=False)
        head = self.model.get_output_embeddings().weight
        own = min(tokenizer.added, default=size)  # ids below it are the folder's own tokens
        with torch.no_grad():
            for i in tokenizer.added:
                name = tokenizer.tok.convert_ids_to_tokens(i).strip("<>|")
                pieces = [p for p in tokenizer.encode(name) if p < own] or [0]
                for table in {id(t): t for t in (self.E, head)}.values():  # once when the head is tied
                    table[i] = table[pieces].mean(0)

    def add_lora(self, rank: int, alpha: float) -> None:
        """LoRA adapters (peft) on every linear layer but the LM head, put into the model in place; its own weights
        freeze. `merged()` folds them back for export."""
        try:
            import peft
        except ImportError:
            raise SoftarError("model.lora_rank needs the optional extra: pip install 'softar[lora]'") from None
        with warnings.catch_warnings():  # GPT-2's Conv1D layers: peft says it sets fan_in_fan_out itself
            warnings.simplefilter("ignore")
            wrapper = peft.get_peft_model(self.model, peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                                      target_modules="all-linear"))
        self.__dict__["peft"] = wrapper  # outside the module tree: its parameters are self.model's own

    def merged(self) -> nn.Module:
        """The transformers model with any LoRA adapters folded into its weights (this model changes with it)."""
        wrapper = self.__dict__.get("peft")
        return wrapper.merge_and_unload() if wrapper is not None else self.model

    @property
    def E(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight  # [V, m]

    @property
    def max_positions(self) -> int:
        return positions_of(self.model.config)

    def hidden(self, vectors: torch.Tensor, positions: torch.Tensor | None = None, cache=None) -> Hidden:
        B, T, _ = vectors.shape
        ring, mask = None, None
        if isinstance(cache, HFRingCache):  # the decode loop's step: the slots each row attends to, then the new ones
            ring, cache, mask = cache, cache.cache, cache.open(T)
        if cache is not None and self.training and torch.is_grad_enabled() and self._checkpointing():
            raise SoftarError("train.checkpointing: transformers drops the KV cache under its gradient checkpointing, "
                              "and this step trains through the cache; turn checkpointing off")
        if positions is None:
            past = cache.get_seq_length() if cache is not None else 0
            positions = torch.arange(past, past + T, device=vectors.device)
        if positions.dim() == 1:
            positions = positions[None].expand(B, T)
        out = self.model.base_model(inputs_embeds=vectors, position_ids=positions, use_cache=cache is not None,
                                    **({"attention_mask": mask} if mask is not None else {}),
                                    **{self._cache_arg: cache})
        if ring is not None:
            ring.close()
        return Hidden(out.last_hidden_state)  # [B, T, d]

    def heads(self, h: Hidden) -> Outputs:
        return Outputs(logits=self.model.get_output_embeddings()(h.last), h_m=h.last, hidden=h.last)

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    def new_cache(self, batch_size: int, max_len: int):
        return transformers_module().DynamicCache()

    def new_ring_cache(self, batch_size: int, size: int) -> HFRingCache:
        return HFRingCache(batch_size, size, self.E.device)

    def shard_units(self) -> list[nn.Module]:
        return []

    def checkpoint_activations(self) -> None:
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers 5 renamed it
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _checkpointing(self) -> bool:
        on = getattr(self.model, "is_activation_checkpointing", None)  # transformers 5's name
        return bool(self.model.is_gradient_checkpointing if on is None else on)

    def describe(self) -> dict:
        c = self.model.config
        return {"n_layer": c.num_hidden_layers, "n_head": c.num_attention_heads, "d_model": c.hidden_size,
                "hf": type(self.model).__name__}

    def flops_per_position(self, context: int) -> float:
        c = self.model.config
        return 6 * sum(p.numel() for p in self.parameters()) + 12 * c.num_hidden_layers * c.hidden_size * context


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A transformers DynamicCache's keys and values [B, H, S, hd], per layer (4.x and 5.x keep them differently)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def _dynamic_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]):
    cache = transformers_module().DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


class HFRingCache:
    """The decode loop's cache for a Hugging Face model (`softar.decode`; softAR's GPT has `RingCache`): the model's
    own DynamicCache, one slot appended per step for every row, and `valid` [B, S], the slots each row attends to
    (an attention mask, with positions given). A row's valid slots are always the last ones: `write_rows` puts a
    recomputed window at the end and masks out the rest of that row. The cache is cropped to its last `size` slots
    (no row holds more) once it has grown to twice that."""

    def __init__(self, batch_size: int, size: int, device: torch.device):
        self.size = size
        self.cache = transformers_module().DynamicCache()
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)

    def open(self, T: int) -> torch.Tensor | None:
        """The attention mask [B, S + T] of a step that appends T slots to every row; None when every slot is valid
        (the model's own causal path, as in `generate`)."""
        self.valid = torch.cat([self.valid, self.valid.new_ones(self.valid.shape[0], T)], 1)
        return None if bool(self.valid.all()) else self.valid.long()

    def close(self) -> None:
        if self.valid.shape[1] >= 2 * self.size:
            self._keep(slice(None), self.valid.shape[1] - self.size)

    def write_rows(self, rows: torch.Tensor, window) -> None:
        """Rows [R] now hold the L-slot windows a DynamicCache holds (the recomputation of their windows)."""
        new = _layers(window)
        L, S = new[0][0].shape[2], self.valid.shape[1]
        if L > S:  # the first windows, or a longer one than the cache holds: invalid slots in front
            pad = L - S
            self.cache = _dynamic_cache([(F.pad(k, (0, 0, pad, 0)), F.pad(v, (0, 0, pad, 0)))
                                         for k, v in _layers(self.cache)] if S else
                                        [(k.new_zeros(len(self.valid), *k.shape[1:]),
                                          v.new_zeros(len(self.valid), *v.shape[1:])) for k, v in new])
            self.valid = F.pad(self.valid, (pad, 0))
            S = L
        for (k, v), (k_new, v_new) in zip(_layers(self.cache), new, strict=True):
            k[rows, :, S - L:], v[rows, :, S - L:] = k_new, v_new
        self.valid[rows] = False
        self.valid[rows, S - L:] = True
        lead = int((~self.valid).long().cummin(1).values.sum(1).min())  # slots no row attends to, in front
        if lead:
            self._keep(slice(None), lead)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (finished sequences leave)."""
        self._keep(rows, 0)

    def _keep(self, rows, start: int) -> None:
        self.cache = _dynamic_cache([(k[rows, :, start:], v[rows, :, start:]) for k, v in _layers(self.cache)])
        self.valid = self.valid[rows, start:]
