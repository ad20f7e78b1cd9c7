"""Model loading from local folders, thread policy, and models without an adapter."""

from __future__ import annotations

import pytest
import torch

from mechunlearn.errors import ConfigError, ModelNotFoundError, SiteError
from mechunlearn.models import HookedModel, load_model
from mechunlearn.models.loading import parse_dtype
from mechunlearn.runtime import choose_thread_count
from mechunlearn.testing.tiny_models import tiny_model, tiny_tokenizer


def test_local_folder_loads_same_logits(saved_llama):
    hm = load_model(str(saved_llama), device="cpu")
    reference = tiny_model("llama")
    inputs = hm.batch(["Fact: Tom Brady plays the sport of"]).model_inputs()
    with torch.no_grad():
        torch.testing.assert_close(hm.model(**inputs).logits, reference(**inputs).logits)
    assert not hm.model.training
    assert hm.adapter.family == "llama"


def test_dtype_option(saved_llama):
    hm = load_model(str(saved_llama), device="cpu", dtype="bfloat16")
    assert next(hm.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="unknown dtype"):
        parse_dtype("float8")


def test_folder_without_config_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(str(tmp_path / "empty"))


def test_pickled_checkpoint_is_refused(tmp_path):
    """Weights load only from safetensors: a folder with only pytorch_model.bin fails."""
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    tiny_model("llama").save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        load_model(str(folder))


def test_unsupported_architecture_evaluates_but_cannot_hook():
    from transformers import AutoModelForCausalLM, OPTConfig

    config = OPTConfig(
        vocab_size=512,
        hidden_size=32,
        num_hidden_layers=1,
        ffn_dim=64,
        num_attention_heads=2,
        word_embed_proj_dim=32,
    )
    hm = HookedModel(AutoModelForCausalLM.from_config(config).eval(), tiny_tokenizer())
    assert hm.adapter is None
    assert hm.batch(["hello there"]).input_ids.shape[0] == 1
    with pytest.raises(SiteError, match="no architecture adapter for model_type 'opt'"):
        with hm.hooks(cache=True):
            pass


def test_thread_policy(monkeypatch):
    monkeypatch.setenv("MECHUNLEARN_THREADS", "3")
    assert choose_thread_count() == 3
    monkeypatch.setenv("MECHUNLEARN_THREADS", "zero")
    with pytest.raises(ValueError, match="MECHUNLEARN_THREADS"):
        choose_thread_count()
    monkeypatch.delenv("MECHUNLEARN_THREADS")
    monkeypatch.setattr("mechunlearn.runtime.machine_is_idle", lambda threshold=0.5: False)
    assert choose_thread_count() == 1


def test_unknown_hub_name_offline_fails_fast(monkeypatch, tmp_path):
    from mechunlearn.models.loading import hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert not hub_reachable()
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        load_model("some-org/no-such-model")


def test_unembedding_gets_a_contiguous_input_with_logits_to_keep():
    """HF slices the kept positions out of the hidden states (a non-contiguous view); on the
    CPU that made linear a per-row batched matmul over the whole unembedding. The handle's one
    pre-hook hands the head a contiguous copy; logits are unchanged."""
    import torch

    from mechunlearn.models.handle import HookedModel, contiguous_unembedding_input
    from mechunlearn.testing.tiny_models import tiny_model, tiny_tokenizer

    model = tiny_model("gemma3")
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(3, 100, (4, 7))
    reference = model(input_ids=ids).logits[:, -2:]
    hm = HookedModel(model, tiny_tokenizer(), name="tiny")
    contiguous_unembedding_input(hm.model)  # idempotent: still one hook
    head = hm.model.get_output_embeddings()
    assert len(head._forward_pre_hooks) == 1
    seen = []
    probe = head.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))
    kept = hm.model(input_ids=ids, logits_to_keep=2).logits
    probe.remove()
    assert seen == [True]
    torch.testing.assert_close(kept, reference, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, plain[k]) for k, v in hm.model.state_dict().items())


@pytest.mark.parametrize("family", ["gemma3", "llama", "gpt2"])
def test_forwards_that_skip_unread_logit_rows_match_full_logits(family):
    """``forward_predicting_last`` unembeds only the rows a loss reads (not the final one);
    ``forward_for_activations`` only the last row. Both agree with a full-logits forward."""
    import torch

    from mechunlearn.models.handle import HookedModel
    from mechunlearn.testing.tiny_models import tiny_model, tiny_tokenizer

    hm = HookedModel(tiny_model(family), tiny_tokenizer(), name="tiny")
    ids = torch.randint(3, 100, (3, 8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    full = hm.model(**inputs).logits
    head = hm.model.get_output_embeddings()
    rows = []
    probe = head.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[1]))
    for keep in (1, 3):
        got = hm.forward_predicting_last(keep, **inputs)
        torch.testing.assert_close(got, full[:, 8 - keep - 1 : 7], rtol=1e-5, atol=1e-5)
    last = hm.forward_for_activations(**inputs).logits
    probe.remove()
    assert rows == [1, 3, 1]
    torch.testing.assert_close(last[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot predict"):
        hm.forward_predicting_last(8, **inputs)


def test_next_token_loss_matches_the_padded_full_logits_formula(family):
    """The LM term unembeds only positions some target reads (not the final one, not columns
    that are padding in every row) and takes a contiguous cross-entropy; value and gradient
    equal the plain formula over full logits."""
    import torch.nn.functional as F

    from mechunlearn.models.batches import left_pad
    from mechunlearn.models.handle import HookedModel
    from mechunlearn.models.next_token import next_token_loss, next_token_nll
    from mechunlearn.testing.tiny_models import tiny_model, tiny_tokenizer

    torch.manual_seed(0)
    hm = HookedModel(tiny_model(family), tiny_tokenizer(), name="tiny")
    batch = left_pad([[5, 9, 11], [7, 8, 9, 10, 12, 13], [4]], hm.pad_id)  # 3 and 1 pad columns

    def plain():
        logits = hm.model(**batch.model_inputs()).logits[:, :-1]
        valid = batch.attention_mask[:, 1:].bool() & batch.attention_mask[:, :-1].bool()
        nll = F.cross_entropy(logits.transpose(1, 2), batch.input_ids[:, 1:], reduction="none")
        return nll[valid].mean()

    head = hm.model.get_output_embeddings()
    rows = []
    probe = head.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[1]))
    got = next_token_loss(hm, batch)
    probe.remove()
    assert rows == [5]  # 6 columns, the final one predicts nothing: all 5 others are read
    got.backward()
    grads = [p.grad.clone() for p in hm.model.parameters()]
    hm.model.zero_grad()
    want = plain()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, p in zip(grads, hm.model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    assert next_token_nll(hm, batch)[1] == 2 + 5
    # a column that is padding in every row is not unembedded
    short = left_pad([[5, 9, 11], [7, 8, 9]], hm.pad_id)
    short.attention_mask[:, 0] = 0
    rows.clear()
    probe = head.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[1]))
    assert next_token_nll(hm, short)[1] == 2 * 1
    probe.remove()
    assert rows == [1]
    assert next_token_nll(hm, left_pad([[4], [5]], hm.pad_id))[1] == 0
    with pytest.raises(ValueError, match="two real tokens"):
        next_token_loss(hm, left_pad([[4], [5]], hm.pad_id))
