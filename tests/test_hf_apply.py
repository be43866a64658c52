"""mixkernels.hf.apply / remove: model(..., labels=...) returns the fused loss with the model's own
loss and gradients (the unpatched model is the oracle), in plain PyTorch, through PEFT, HF Trainer
(gradient accumulation) and TRL's SFTTrainer. ZeRO-3 / FSDP2 runs: tests/test_hf_apply_dist.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import mixkernels.hf as mkhf

transformers = pytest.importorskip("transformers")

VOCAB = 83
CLOSE = {"atol": 1e-5, "rtol": 1e-5}
GRAD_CLOSE = {"atol": 1e-5, "rtol": 1e-4}


def tiny(family: str, seed: int = 0) -> torch.nn.Module:
    common = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    torch.manual_seed(seed)
    if family == "llama":
        cfg = transformers.LlamaConfig(**common)
    elif family == "llama_tied":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=True)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common)
    elif family == "mistral":
        cfg = transformers.MistralConfig(**common)
    elif family == "gemma":
        cfg = transformers.GemmaConfig(**common, head_dim=8)
    elif family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    elif family == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=64)
    elif family == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(**common, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                          num_experts=4, num_experts_per_tok=2, output_router_logits=True,
                                          router_aux_loss_coef=0.3)
    elif family == "granite":
        cfg = transformers.GraniteConfig(**common, logits_scaling=4.0)
    elif family == "cohere":
        cfg = transformers.CohereConfig(**common, logit_scale=0.25)
    elif family == "gemma2":
        cfg = transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=2.0)
    else:
        raise ValueError(family)
    cfg._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()  # eval: no dropout


def batch(b: int = 3, t: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, t - 3:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, :4] = -100  # prompt tokens not trained on
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, **kw):
    model.zero_grad(set_to_none=True)
    out = model(**kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_grads_equal(got, ref):
    assert got.keys() == ref.keys()
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, **GRAD_CLOSE, msg=name)


FAMILIES = ["llama", "llama_tied", "qwen2", "mistral", "gemma", "gpt2", "gpt_neox"]


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_matches_model_loss_and_gradients(family):
    model = tiny(family)
    data = batch()
    ref, ref_grads = loss_and_grads(model, **data)
    ref_logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits.detach()
    assert mkhf.apply(model) is model and mkhf.is_applied(model)
    out, grads = loss_and_grads(model, **data)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, **CLOSE)
    assert_grads_equal(grads, ref_grads)
    # without labels: the model's own logits
    no_labels = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"])
    assert no_labels.loss is None
    torch.testing.assert_close(no_labels.logits, ref_logits, atol=0, rtol=0)
    mkhf.remove(model)
    assert "forward" not in model.__dict__ and not mkhf.is_applied(model)
    again = model(**data)
    assert again.logits is not None
    torch.testing.assert_close(again.loss, ref.loss, atol=0, rtol=0)


def test_num_items_in_batch_and_ignore_index():
    """Trainer's gradient-accumulation convention: sum of token losses / num_items_in_batch."""
    model = tiny("llama")
    data = batch()
    for num_items in (torch.tensor(37), 11):
        ref, ref_grads = loss_and_grads(model, **data, num_items_in_batch=num_items)
        mkhf.apply(model)
        out, grads = loss_and_grads(model, **data, num_items_in_batch=num_items)
        mkhf.remove(model)
        torch.testing.assert_close(out.loss, ref.loss, **CLOSE)
        assert_grads_equal(grads, ref_grads)
    labels = data["labels"].masked_fill(data["labels"] == -100, -1)
    ref = model(**{**data, "labels": labels}, ignore_index=-1).loss
    mkhf.apply(model)
    torch.testing.assert_close(model(**{**data, "labels": labels}, ignore_index=-1).loss, ref, **CLOSE)


def test_shift_labels():
    model = tiny("qwen2")
    data = batch()
    shift = F.pad(data["labels"][:, 1:], (0, 1), value=-100)
    shift[0, 2] = -100
    ref, ref_grads = loss_and_grads(model, input_ids=data["input_ids"], attention_mask=data["attention_mask"],
                                    labels=data["labels"], shift_labels=shift)
    mkhf.apply(model)
    out, grads = loss_and_grads(model, input_ids=data["input_ids"], attention_mask=data["attention_mask"],
                                labels=data["labels"], shift_labels=shift)
    torch.testing.assert_close(out.loss, ref.loss, **CLOSE)
    assert_grads_equal(grads, ref_grads)


def test_group_outputs_per_example_and_per_token():
    model = tiny("mistral")
    data = batch()
    logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits.detach().double()
    labels = data["labels"]
    tok = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), reduction="none",
                          ignore_index=-100).reshape(3, -1)
    counted = labels[:, 1:] != -100
    mkhf.apply(model)
    out = model(**data, group_ids=torch.arange(3), num_groups=3, return_token_loss=True)
    torch.testing.assert_close(out.group_loss.double(), tok.sum(1), **CLOSE)
    assert out.group_count.tolist() == counted.sum(1).tolist()
    torch.testing.assert_close(out.token_loss[:, :-1].double(), tok, **CLOSE)
    assert (out.token_loss[:, -1] == 0).all()
    # per-token groups are aligned with labels: the predicted token's group counts
    per_tok = torch.randint(0, 2, labels.shape, generator=torch.Generator().manual_seed(3))
    out = model(**data, group_ids=per_tok, num_groups=2)
    g = per_tok[:, 1:][counted]
    exp = torch.zeros(2, dtype=torch.float64).index_add_(0, g, tok[counted])
    torch.testing.assert_close(out.group_loss.double(), exp, **CLOSE)
    assert out.group_count.tolist() == torch.bincount(g, minlength=2).tolist()
    with pytest.raises(ValueError, match="group_ids has shape"):
        model(**data, group_ids=per_tok[:, :4], num_groups=2)
    with pytest.raises(ValueError, match="need labels"):
        model(input_ids=data["input_ids"], group_ids=torch.arange(3), num_groups=3)


def test_return_dict_false_and_logits_to_keep():
    model = tiny("llama")
    data = batch()
    ref = model(**data).loss
    mkhf.apply(model)
    tup = model(**data, return_dict=False)
    assert isinstance(tup, tuple)
    torch.testing.assert_close(tup[0], ref, **CLOSE)
    with pytest.raises(ValueError, match="logits_to_keep=1"):
        model(**data, logits_to_keep=1)


def test_moe_router_aux_loss_added_like_transformers():
    model = tiny("qwen2_moe")
    data = batch()
    ref, ref_grads = loss_and_grads(model, **data)
    assert ref.aux_loss is not None
    mkhf.apply(model)
    out, grads = loss_and_grads(model, **data)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, **CLOSE)
    torch.testing.assert_close(out.loss, ref.loss, **CLOSE)
    assert_grads_equal(grads, ref_grads)


@pytest.mark.parametrize("family", ["granite", "cohere", "gemma2"])
def test_logit_transforms_exact_or_refused(family):
    """Granite divides, Cohere multiplies, Gemma 2 softcaps the logits: exact when the op has the
    option, else one error naming the config attribute (never a silently different loss)."""
    import inspect

    attr = {"granite": "logits_scaling", "cohere": "logit_scale", "gemma2": "final_logit_softcapping"}[family]
    option = {"granite": "logit_scale", "cohere": "logit_scale", "gemma2": "softcap"}[family]
    model = tiny(family)
    data = batch()
    ref, ref_grads = loss_and_grads(model, **data)
    if option not in inspect.signature(mkhf.linear_cross_entropy).parameters:
        with pytest.raises(NotImplementedError, match=f"config.{attr}="):
            mkhf.apply(model)
        with pytest.raises(NotImplementedError, match=f"config.{attr}="):
            mkhf.causal_lm_loss(model, data["input_ids"], data["attention_mask"], data["labels"])
        return
    mkhf.apply(model)
    out, grads = loss_and_grads(model, **data)
    torch.testing.assert_close(out.loss, ref.loss, **CLOSE)
    assert_grads_equal(grads, ref_grads)
    mkhf.remove(model)
    fused = mkhf.causal_lm_loss(model, data["input_ids"], data["attention_mask"], data["labels"])
    torch.testing.assert_close(fused.loss, ref.loss, **CLOSE)


def test_peft_lora_wrapper():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B so LoRA changes the output
            torch.nn.init.normal_(p, std=0.1)
    data = batch()
    ref, ref_grads = loss_and_grads(model, **data)
    assert ref_grads and all("lora_" in n for n in ref_grads)
    mkhf.apply(model)
    out, grads = loss_and_grads(model, **data)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, **CLOSE)
    assert_grads_equal(grads, ref_grads)
    mkhf.remove(model)
    assert model(**data).logits is not None


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        mkhf.apply("llama")
    model = tiny("llama")
    with pytest.raises(ValueError, match="chunk_size must be None or an int >= 1, got 0"):
        mkhf.apply(model, chunk_size=0)
    with pytest.raises(ValueError, match="was not patched"):
        mkhf.remove(model)
    with pytest.raises(TypeError, match="no plain nn.Linear LM head"):
        mkhf.apply(torch.nn.Linear(3, 4))


def test_apply_chunk_size_and_reapply():
    model = tiny("llama")
    data = batch()
    ref = model(**data).loss
    mkhf.apply(model, chunk_size=7)
    mkhf.apply(model, chunk_size=5)  # re-applying replaces the first patch
    torch.testing.assert_close(model(**data).loss, ref, **CLOSE)
    mkhf.remove(model)
    assert "forward" not in model.__dict__


# ---- HF Trainer and TRL SFTTrainer ---------------------------------------------------------------


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n: int, t: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for i in range(n):
            length = t - (i % 4)  # different lengths: token counts differ between micro-batches
            ids = torch.randint(0, VOCAB, (length,), generator=g)
            labels = ids.clone()
            labels[: 1 + i % 3] = -100
            self.rows.append({"input_ids": ids.tolist(), "labels": labels.tolist()})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def _collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    t = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(r["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _train(model, tmp_path, patched: bool, trainer_cls=None, **extra):
    args_cls = extra.pop("args_cls", transformers.TrainingArguments)
    args = args_cls(
        output_dir=str(tmp_path / ("patched" if patched else "plain")), per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2, optim="sgd", lr_scheduler_type="constant",
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, seed=0, dataloader_num_workers=0,
        disable_tqdm=True, **extra.pop("args", {}),
    )
    if patched:
        mkhf.apply(model)
    seen = []  # (had labels, returned logits) of every forward through the model's __call__
    model.register_forward_hook(lambda m, a, kw, out: seen.append((kw.get("labels") is not None,
                                                                   getattr(out, "logits", None) is not None)),
                                with_kwargs=True)
    trainer = (trainer_cls or transformers.Trainer)(model=model, args=args, **extra)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {n: p.detach().clone() for n, p in model.named_parameters()}, losses, seen


def test_hf_trainer_gradient_accumulation_same_parameters(tmp_path):
    base = tiny("llama")
    results = []
    for patched in (False, True):
        model = copy.deepcopy(base)
        results.append(_train(model, tmp_path, patched, train_dataset=_Rows(12, 9, 0), data_collator=_collate))
    (p_plain, l_plain, seen_plain), (p_fused, l_fused, seen_fused) = results
    assert len(l_plain) == 3
    assert seen_fused == [(True, False)] * 6  # 3 steps x 2 micro-batches, all fused (no logits)
    assert seen_plain == [(True, True)] * 6
    torch.testing.assert_close(torch.tensor(l_fused), torch.tensor(l_plain), atol=1e-5, rtol=1e-5)
    moved = 0
    for name, p in p_plain.items():
        torch.testing.assert_close(p_fused[name], p, atol=1e-5, rtol=1e-4, msg=name)
        moved += int(not torch.equal(p, base.state_dict()[name]))
    assert moved > 0  # training changed the parameters


def _word_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(VOCAB - 3)}
    vocab.update({"<pad>": VOCAB - 3, "<eos>": VOCAB - 2, "<unk>": VOCAB - 1})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def test_trl_sft_trainer_same_parameters(tmp_path):
    """TRL >= 1 computes SFT losses with its own fused LM head (``add_fused_lm_head`` runs the backbone
    directly and bypasses ``model.forward``); an ``apply``'d model must train exactly as a plain one,
    and every labelled forward that does reach the model's forward gets the fused loss."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(5)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 3, (6 + k % 5,), generator=g)) for k in range(12)]
    data = datasets.Dataset.from_dict({"text": texts})
    base = tiny("llama")
    results = []
    for patched in (False, True):
        model = copy.deepcopy(base)
        results.append(_train(model, tmp_path, patched, trainer_cls=trl.SFTTrainer, args_cls=trl.SFTConfig,
                              args={"max_length": 32, "dataset_text_field": "text"},
                              train_dataset=data, processing_class=_word_tokenizer()))
    (p_plain, l_plain, _), (p_fused, l_fused, seen) = results
    assert all(not logits for labelled, logits in seen if labelled)
    torch.testing.assert_close(torch.tensor(l_fused), torch.tensor(l_plain), atol=1e-5, rtol=1e-5)
    for name, p in p_plain.items():
        torch.testing.assert_close(p_fused[name], p, atol=1e-5, rtol=1e-4, msg=name)


def test_generate_unchanged():
    """Generation calls the forward without labels (and validates kwargs against its signature)."""
    model = tiny("llama")
    ids = batch()["input_ids"][:1, :5]
    ref = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    mkhf.apply(model)
    torch.testing.assert_close(model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0), ref)
