"""Regenerate the demo's bundled assets (run once; the outputs are committed):
python/fastqlora/data/demo.jsonl, a byte-level BPE tokenizer trained on it, and a tiny
Llama-architecture checkpoint with random weights, all under python/fastqlora/data/.

    python scripts/make_demo_assets.py
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DATA = Path(__file__).resolve().parents[1] / "python" / "fastqlora" / "data"

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Ireland", "Dublin"), ("Hungary", "Budapest"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Thailand", "Bangkok"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Cuba", "Havana"), ("Australia", "Canberra"), ("Russia", "Moscow"), ("Turkey", "Ankara"),
    ("Iran", "Tehran"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Czechia", "Prague"),
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def records() -> list[dict]:
    out = []
    for country, capital in CAPITALS:
        out.append({"instruction": f"What is the capital of {country}?",
                    "output": f"The capital of {country} is {capital}."})
        out.append({"instruction": f"Which city is the capital of {country}?",
                    "output": f"{capital} is the capital of {country}."})
    random.Random(0).shuffle(out)
    return out


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|begin|>", "<|end|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=448, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|end|>",
                                   pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def main() -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    recs = records()
    with (DATA / "demo.jsonl").open("w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    from fastqlora.train.data import ALPACA_NO_INPUT

    texts = [ALPACA_NO_INPUT.format(instruction=r["instruction"]) + r["output"] for r in recs]
    model_dir = DATA / "demo_model"
    tok = build_tokenizer(texts)
    tok.save_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, torch_dtype="float32",
    )
    LlamaForCausalLM(cfg).save_pretrained(model_dir, safe_serialization=True)
    print(f"wrote {len(recs)} records, a {len(tok)}-token tokenizer and a tiny Llama to {DATA}")


if __name__ == "__main__":
    main()
