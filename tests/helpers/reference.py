"""Small random DiffusionGemma checkpoints built with the transformers reference.

Every parameter and persistent buffer is perturbed away from its initial value,
so a port that ignores one (a norm weight, a router scale, a layer scalar) gives
different logits.
"""

import json
from pathlib import Path

import numpy as np
import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DiffusionGemmaTextConfig
from transformers.cache_utils import DynamicCache
from transformers.models.gemma4 import Gemma4VisionConfig

from .tiny_tokenizer import image_token_ids

TINY_TEXT = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    # Four layers, both kinds twice. Deeper random models amplify float32 rounding:
    # with six layers the reference's own float32 logits are ~1e-4 off its float64 ones.
    num_hidden_layers=4,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    num_global_key_value_heads=1,
    sliding_window=8,
    num_experts=8,
    top_k_experts=2,
    moe_intermediate_size=64,
    max_position_embeddings=512,
)

TINY_VISION = dict(
    hidden_size=16,
    num_hidden_layers=1,
    intermediate_size=32,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
    patch_size=2,
)


# The released 26B-A4B model's text configuration (no vision tower).
REAL_CONFIG = json.loads((Path(__file__).parents[1] / "real_26b_config.json").read_text())  # tests/real_26b_config.json


def build_reference(seed: int = 0, canvas_length: int = 12, perturb: bool = True, **text_overrides) -> DiffusionGemmaForBlockDiffusion:
    torch.manual_seed(seed)
    text = DiffusionGemmaTextConfig(**{**TINY_TEXT, **text_overrides})
    config = DiffusionGemmaConfig(
        text_config=text,
        vision_config=Gemma4VisionConfig(**TINY_VISION),
        canvas_length=canvas_length,
        **image_token_ids(text.vocab_size),
    )
    model = DiffusionGemmaForBlockDiffusion(config).eval().float()
    if perturb:
        _perturb(model, seed)
    return model


def _perturb(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                # Attention scale is 1: q/k norm weights near 0.3 keep attention logits O(1), so
                # float32 rounding in the reference itself stays near 1e-5 (near 1 it is 1e-4).
                p.add_(0.3)
            elif name.endswith(("norm.weight", ".scale", "per_expert_scale")):
                p.add_(1.0)  # keep norms and scales around 1 so activations stay sane
        for name, p in model.named_parameters():
            if name.startswith("model.encoder.language_model.") and name.endswith(".bias"):
                # transformers ties the encoder's weights to the decoder's, not its
                # biases; the model has one set, which this port shares
                p.copy_(model.get_parameter(name.replace("encoder.language_model.", "decoder.")))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                # encoder and decoder scalars must differ, and differ per layer
                b.copy_(0.6 + torch.rand(b.shape, generator=gen))


def save_reference(model: DiffusionGemmaForBlockDiffusion, path: Path, global_head_dim_form: bool = False) -> Path:
    model.save_pretrained(path)
    if global_head_dim_form:
        config_file = Path(path) / "config.json"
        config = json.loads(config_file.read_text())
        text = config["text_config"]
        overrides = next(iter(text.pop("per_layer_config").values()))
        text["global_head_dim"] = overrides["head_dim"]
        text["num_global_key_value_heads"] = overrides["num_key_value_heads"]
        config_file.write_text(json.dumps(config, indent=2))
    return Path(path)


class ReferenceRunner:
    """Drives the reference model the way its generation loop does."""

    def __init__(self, model: DiffusionGemmaForBlockDiffusion):
        self.model = model
        self.cache = DynamicCache(config=model.config.get_text_config())

    @torch.no_grad()
    def encode(self, ids) -> None:
        self.model.model.encoder(input_ids=torch.tensor(ids).reshape(1, -1), past_key_values=self.cache)

    @torch.no_grad()
    def decode(self, canvas, self_conditioning_logits=None) -> np.ndarray:
        sc = None if self_conditioning_logits is None else torch.tensor(np.asarray(self_conditioning_logits))
        out = self.model(
            decoder_input_ids=torch.tensor(canvas).reshape(1, -1),
            past_key_values=self.cache,
            self_conditioning_logits=sc,
        )
        return out.logits.numpy()


def perturb_vision(model, seed: int) -> None:
    """Moves every vision parameter and buffer (std_bias / std_scale
    included) away from its initial value, as build_reference does the text
    model's. Clipping bounds are left open (tests/test_vision.py sets them)."""
    gen = torch.Generator().manual_seed(seed)
    prefixes = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(prefixes):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    p.add_(0.3)
                elif name.endswith("norm.weight"):
                    p.add_(1.0)
        for name, b in model.named_buffers():
            if not name.startswith(prefixes) or name.endswith(("inv_freq", "_min", "_max")):
                continue
            if name.endswith("std_bias"):
                b.copy_(torch.rand(b.shape, generator=gen) - 0.5)
            elif name.endswith("std_scale"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
            else:
                raise AssertionError(f"unexpected vision buffer {name}: perturb it here")


def build_vision_reference(seed: int = 0, vision: dict = None, canvas_length: int = 12, **text_overrides):
    """build_reference with a vision tower of `vision` (TINY_VISION and
    these), every vision parameter and buffer perturbed too."""
    torch.manual_seed(seed)
    text = DiffusionGemmaTextConfig(**{**TINY_TEXT, **text_overrides})
    config = DiffusionGemmaConfig(
        text_config=text,
        vision_config=Gemma4VisionConfig(**{**TINY_VISION, **(vision or {})}),
        canvas_length=canvas_length,
        **image_token_ids(text.vocab_size),
    )
    model = DiffusionGemmaForBlockDiffusion(config).eval().float()
    _perturb(model, seed)
    perturb_vision(model, seed + 2)
    return model
