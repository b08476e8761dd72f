"""LoRA adapters: what training saves is what generate/Serve load, text-encoder half included.

(transformers 5 prints a loading report calling the text-encoder LoRA keys "MISSING"; the values
below show they are loaded all the same.)"""

import numpy as np
import torch
from safetensors.torch import load_file

from raybooth.platform.lora import WEIGHTS_NAME, add_lora, read_lora_metadata, save_lora_adapter
from raybooth.platform.models import load_components, resolve_model
from raybooth.platform.pipelines import DiffusionRunner
from raybooth.platform.generation import GenerationParams


def test_text_encoder_half_of_an_adapter_is_loaded_and_used(tmp_path):
    comps = load_components(resolve_model("tiny"))
    add_lora(comps["unet"], comps["text_encoder"], rank=4)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in comps["text_encoder"].named_parameters():
            if "lora_B" in name:  # only the text encoder's adapter does anything
                param.normal_(0, 0.5)
    save_lora_adapter(tmp_path / "te", comps["unet"], comps["text_encoder"], {"base_model": "tiny"})
    assert read_lora_metadata(tmp_path / "te") == {"base_model": "tiny"}
    saved = load_file(tmp_path / "te" / WEIGHTS_NAME)
    assert any(k.startswith("text_encoder.") for k in saved)

    runner = DiffusionRunner("tiny")
    params = GenerationParams(steps=3)
    before = runner.text_to_image(["a toy"], [1], params)[0]
    runner.load_lora(tmp_path / "te", "subject")
    loaded = dict(runner.components["text_encoder"].named_parameters())
    key = "text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight"
    assert torch.equal(loaded["encoder.layers.0.self_attn.q_proj.lora_B.subject.weight"], saved[key])

    params.lora = "subject"
    with_subject = runner.text_to_image(["a toy"], [1], params)[0]
    params.lora = None
    without = runner.text_to_image(["a toy"], [1], params)[0]
    diff = np.abs(np.asarray(before, dtype=int) - np.asarray(with_subject, dtype=int)).max()
    assert diff > 0  # the text-encoder adapter changes the conditioning
    assert without.tobytes() == before.tobytes()  # and switching it off restores the base model
