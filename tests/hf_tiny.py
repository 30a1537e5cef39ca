"""Tiny random Hugging Face models saved the way users save real ones (model + processor), offline.

The tokenizer is a word-level one built in memory; the configs are the real architectures'
with widths of 32 and two layers, so each model saves, loads and runs in well under a second.
"""
from __future__ import annotations

import torch

from helpers import perturb

WORDS = ("Which of these is in the image : { classes } ? Answer with one them . a photo USER ASSISTANT "
         "red car bus cat dog b c").split()
SIZE = 32  # image side of every tiny vision tower
PATCH = 8


def tokenizer(special: tuple[str, ...] = (), **named: str):
    """A word-level tokenizer over WORDS (others become <unk>), with extra special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<unk>", "<s>", "</s>", "<pad>", *special, *named.values(), *WORDS]))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens=named or list(special))


def llama_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=False)


def clip_vision_config(**kw):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=SIZE, patch_size=PATCH, projection_dim=32, **kw)


def image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})


def save(model, processor, path: str, seed: int) -> str:
    perturb(model, seed=seed, scale=0.1)  # random init gives near-uniform outputs; noise makes heads matter
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def save_clip(path: str, seed: int = 0) -> str:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTextConfig

    tok = tokenizer()
    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=32, projection_dim=32,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=clip_vision_config().to_dict(), projection_dim=32))
    return save(model, CLIPProcessor(image_processor=image_processor(), tokenizer=tok), path, seed)


def save_llava(path: str, seed: int = 0) -> str:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = tokenizer(("<image>",))
    config = LlavaConfig(vision_config=clip_vision_config(), text_config=llama_config(len(tok)),
                         image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(image_processor=image_processor(), tokenizer=tok, patch_size=PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return save(model, processor, path, seed)


def save_llava_next(path: str, seed: int = 0) -> str:
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok = tokenizer(("<image>",))
    grid = [[SIZE, 2 * SIZE], [2 * SIZE, SIZE], [2 * SIZE, 2 * SIZE]]
    config = LlavaNextConfig(vision_config=clip_vision_config(), text_config=llama_config(len(tok)),
                             image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_grid_pinpoints=grid)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    images = LlavaNextImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                     image_grid_pinpoints=grid)
    processor = LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return save(model, processor, path, seed)


def save_internvl(path: str, seed: int = 0) -> str:
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVisionConfig,
    )
    from transformers.models.internvl.video_processing_internvl import (
        InternVLVideoProcessor,
    )

    tok = tokenizer(start_image_token="<img>", end_image_token="</img>", context_image_token="<IMG_CONTEXT>",
                    video_token="<video>")
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=SIZE, patch_size=PATCH, use_qk_norm=True, norm_type="rms_norm")
    seq = (SIZE // PATCH) ** 2 // 4  # tokens per tile after the 0.5 pixel shuffle
    config = InternVLConfig(vision_config=vision, text_config=llama_config(len(tok)), image_seq_length=seq,
                            image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    images = GotOcr2ImageProcessor(size={"height": SIZE, "width": SIZE}, crop_to_patches=False)
    processor = InternVLProcessor(image_processor=images, tokenizer=tok, video_processor=InternVLVideoProcessor(),
                                  image_seq_length=seq)
    return save(model, processor, path, seed)


SAVERS = {"clip": save_clip, "llava": save_llava, "llava_next": save_llava_next, "internvl": save_internvl}
