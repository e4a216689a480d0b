"""Chapter 9's pieces: the question scenes (effnb.data) and the vision tower / consumer plumbing (effnb.tokens)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import effnb.data as D
import effnb.tokens as K


@pytest.fixture(scope="module")
def scenes() -> D.QuestionScenes:
    return D.make_question_scenes(300, 32, seed=5)


@pytest.fixture(scope="module")
def tower():
    torch.manual_seed(0)
    return K.vision_tower(32, 4, width=32, layers=2, heads=2).eval()


# --- the scenes ----------------------------------------------------------------------------------

def test_scenes_are_deterministic_and_bounded(scenes):
    again = D.make_question_scenes(300, 32, seed=5)
    assert torch.equal(scenes.images, again.images) and torch.equal(scenes.answer, again.answer)
    assert not torch.equal(scenes.images, D.make_question_scenes(300, 32, seed=6).images)
    assert scenes.images.shape == (300, 3, 32, 32) and scenes.images.dtype == torch.float32
    assert 0 <= scenes.images.min() and scenes.images.max() <= 1
    assert ((scenes.shapes >= 0).sum(1) >= 1).all(), "every scene holds an object"
    assert torch.equal(scenes.shapes >= 0, scenes.colours >= 0)


def test_answers_follow_from_the_objects(scenes):
    for i in range(len(scenes)):
        kind, arg = scenes.question[i].tolist()
        shapes, colours = scenes.shapes[i].tolist(), scenes.colours[i].tolist()
        answer = D.ANSWERS[scenes.answer[i]]
        if kind == 0:
            assert answer == str(sum(s >= 0 for s in shapes))
        elif kind == 1:
            assert answer == ("yes" if arg in colours else "no")
        elif kind == 2:
            assert answer == (D.QUESTION_SHAPES[shapes[arg]] if shapes[arg] >= 0 else "nothing")
        else:
            assert answer == (D.QUESTION_COLOURS[colours[arg]] if colours[arg] >= 0 else "nothing")
    assert scenes.question_text(0).endswith("?")


def test_objects_sit_in_their_quadrant_in_their_colour(scenes):
    for i in range(20):
        for q in range(4):
            rows, cols = slice(16 * (q // 2), 16 * (q // 2) + 16), slice(16 * (q % 2), 16 * (q % 2) + 16)
            region = scenes.objects[i, rows, cols]
            if scenes.shapes[i, q] < 0:
                assert (region == 0).all()
            else:
                label = 1 + 4 * int(scenes.shapes[i, q]) + int(scenes.colours[i, q])
                assert (region == label).sum() >= 20 and set(region.unique().tolist()) <= {0, label}
                pixels = scenes.images[i, :, rows, cols][:, region == label]
                assert pixels.mean(1).argmax() == [0, 1, 2, 0][int(scenes.colours[i, q])]  # yellow: red >= green


def test_patch_labels_by_hand():
    s = D.make_question_scenes(2, 16, seed=0)
    objects = torch.zeros(2, 16, 16, dtype=torch.long)
    objects[0, :4, :4] = 3                    # a full patch
    objects[0, 4:5, 4:8] = 5                  # a quarter of a patch: counts
    objects[0, 8:8, 8:12] = 7                 # nothing
    objects[1, 0, 0] = 2                      # one pixel: background
    labels = D.QuestionScenes(s.images, objects, s.shapes, s.colours, s.question, s.answer).patch_labels(4)
    assert labels.shape == (2, 16) and labels[0, 0] == 3 and labels[0, 5] == 5 and labels[0].sum() == 8
    assert labels[1].sum() == 0
    with pytest.raises(ValueError, match="patch=5 must divide the image size 16"):
        s.patch_labels(5)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(n=0), ValueError, "n=0 must be a whole number >= 1"),
    (dict(n=10, size=15), ValueError, "size=15 must be an even number >= 16"),
    (dict(n=10, occupancy=0), ValueError, "occupancy=0 is the chance"),
])
def test_scene_parameter_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        D.make_question_scenes(**kwargs)


# --- the tower, the hooks, the consumer -----------------------------------------------------------

def test_encode_returns_the_penultimate_tokens_and_the_last_layers_keys_and_cls_query(tower, scenes):
    images = scenes.images[:4]
    encoded = K.encode(tower, images, batch_size=3)
    out = tower(pixel_values=images, output_hidden_states=True)
    last = tower.encoder.layers[-1]
    normed = last.layer_norm1(out.hidden_states[-2])
    assert torch.allclose(encoded.features, out.hidden_states[-2][:, 1:])
    assert torch.allclose(encoded.keys, last.self_attn.k_proj(normed)[:, 1:], atol=1e-6)
    assert torch.allclose(encoded.cls_query, last.self_attn.q_proj(normed)[:, 0], atol=1e-6)
    assert torch.allclose(encoded.cls_key, last.self_attn.k_proj(normed)[:, 0], atol=1e-6)
    assert encoded.features.shape == (4, 64, 32) and encoded.cls_key.shape == (4, 32)
    assert len(encoded.subset(slice(0, 2))) == 2
    assert not last.self_attn.k_proj._forward_hooks, "the hooks are removed"


def test_subset_keeps_every_field_row_aligned(tower, scenes):
    encoded = K.encode(tower, scenes.images[:5])
    part = encoded.subset(torch.tensor([3, 1]))
    for name in ("features", "keys", "cls_query", "cls_key"):
        assert torch.equal(getattr(part, name), getattr(encoded, name)[[3, 1]]), name


def test_vision_tower_refuses_a_patch_that_does_not_divide_the_image():
    with pytest.raises(ValueError, match="patch_size=5 must divide image_size=32"):
        K.vision_tower(32, 5)


def test_consumer_ignores_padding_and_learns(scenes, tower):
    torch.manual_seed(0)
    consumer = K.Consumer(32, width=16, layers=1, heads=2).eval()
    tokens, question = torch.randn(2, 5, 32), scenes.question[:2]
    padded = torch.cat([tokens, torch.randn(2, 3, 32) * 100], 1)
    mask = torch.arange(8)[None].expand(2, -1) >= 5
    assert torch.allclose(consumer(tokens, question), consumer(padded, question, mask), atol=1e-5)
    encoded = K.encode(tower, scenes.images)
    losses = K.fit_consumer(consumer, encoded, scenes, 60, batch_size=32, seed=0, progress=False)
    assert sum(losses[-10:]) < sum(losses[:10]), "the loss falls"
    accuracy = K.answer_accuracy(consumer, encoded, scenes)
    assert set(accuracy) == {"all", "how many", "is there", "what shape", "what colour"}
    assert 0 <= accuracy["all"] <= 1


def test_a_reduction_reaches_the_consumer(scenes, tower):
    encoded = K.encode(tower, scenes.images[:50])
    consumer = K.Consumer(32, width=16, layers=1, heads=2)
    seen = []

    def first_token(batch, generator):
        seen.append(len(batch))
        return batch.features[:, :1], torch.zeros(len(batch), 1, dtype=torch.bool)

    K.fit_consumer(consumer, encoded, scenes.subset(slice(0, 50)), 2, batch_size=8, reduce=first_token, progress=False)
    assert seen == [8, 8]
    with pytest.raises(ValueError, match="encoded has 50 images but scenes has 300"):
        K.fit_consumer(consumer, encoded, scenes, 1, progress=False)


def test_pretraining_learns_the_auxiliary_heads(scenes):
    torch.manual_seed(0)
    small = K.vision_tower(32, 8, width=32, layers=2, heads=2)
    accuracy = K.pretrain_vision_tower(small, scenes, scenes, steps=150, batch_size=32, lr=3e-3, progress=False)
    assert accuracy["colour"] > 0.6 and accuracy["patch"] > 0.8, accuracy


# --- the stored tower -----------------------------------------------------------------------------

def test_stored_tower_verifies_and_loads():
    if not K.CHECKPOINT.exists():
        pytest.fail(f"{K.CHECKPOINT} is missing; run `{K.MAKE_SCRIPT}`")
    tower, meta = K.load_vision_tower()
    assert meta["settings"]["image_size"] == 32 and meta["accuracy"]["patch"] > 0.95
    assert not tower.training


def test_a_changed_or_missing_tower_names_the_script(tmp_path, tower):
    path = tmp_path / "tower.safetensors"
    K.save_vision_tower(tower, path, {"image_size": 32, "patch_size": 4, "width": 32, "layers": 2, "heads": 2})
    loaded, _ = K.load_vision_tower(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), tower.state_dict().values()))
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="make_vision_tower.py"):
        K.load_vision_tower(path)
    with pytest.raises(FileNotFoundError, match="re-create it with `python scripts/make_vision_tower.py`"):
        K.load_vision_tower(tmp_path / "other.safetensors")


# --- Chapter 9's LLaVA section on a local checkpoint folder ----------------------------------------

def _tiny_llava_folder(path):
    """A LLaVA-1.5-format folder (config, safetensors weights, tokenizer, image processor) with random weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, PreTrainedTokenizerFast)

    words = ["<unk>", "<s>", "</s>", "<pad>", "USER:", "ASSISTANT:", "What", "is", "in", "the", "picture?", "<image>"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=4, vision_feature_select_strategy="default",
                   image_token="<image>", num_additional_image_tokens=1).save_pretrained(path)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=len(words), max_position_embeddings=512)
    config = LlavaConfig(vision_config=K.vision_tower().config, text_config=text, image_token_index=len(words) - 1,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)


def test_chapter_llava_section_runs_on_a_local_checkpoint_folder(tmp_path):
    """Chapter 9's section 6 with LLAVA_CHECKPOINT set: the real-checkpoint branch (processor, fp16 weights,
    the sample photo) on a tiny folder in LLaVA-1.5's format, with the chapter's own PruMerge functions."""
    import ast
    import warnings

    import nbformat

    _tiny_llava_folder(tmp_path)
    nb = nbformat.read(Path(__file__).resolve().parent.parent / "notebooks" / "09_prumerge.ipynb", as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    wanted = {"cls_attention", "iqr_count", "merge_neighbours", "top_index", "gather_tokens", "spatial_sample",
              "kept_mask", "prumerge"}
    namespace = {"LLAVA_CHECKPOINT": str(tmp_path), "NEIGHBOURS": 4, "PROFILE": "ci", "SEED": 0, "DEVICE": "cpu"}
    exec(next(s for s in code if s.startswith("import copy")), namespace)
    for source in code[2:]:                      # after the install and parameters cells
        tree = ast.parse(source)
        functions = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in wanted]
        if functions:
            exec(compile(ast.Module(functions, []), "chapter 9", "exec"), namespace)
    section = [s for s in code if "LLAVA_CHECKPOINT is None" in s or "def llava_prefill" in s]
    assert len(section) == 2 and wanted <= set(namespace)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for source in section:
            exec(source, namespace)
    assert namespace["full_len"] == 71 and namespace["short_len"] < namespace["full_len"]
    assert namespace["short_lm_flops"] < namespace["full_lm_flops"]
    assert namespace["llava"].dtype == torch.float16
