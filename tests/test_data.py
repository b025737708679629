"""Prompt loading, left padding and the data errors users hit."""

import pytest

from lit_rlhf.data import PromptDataModule


def _setup(path, tokenizer, **kwargs):
    dm = PromptDataModule(path, tokenizer=tokenizer, **kwargs)
    dm.setup("fit")
    return dm


def test_left_padded_batches(tiny_llama, prompts_file):
    dm = _setup(prompts_file(["the movie was", "it", "my day felt very"]), tiny_llama, batch_size=3, shuffle=False)
    batch = next(iter(dm.train_dataloader()))
    assert batch["prompts"] == ["the movie was", "it", "my day felt very"]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]]
    assert batch["input_ids"][1, :3].tolist() == [dm.pad_token_id] * 3


@pytest.mark.parametrize("suffix", ["csv", "parquet", "json"])
def test_other_file_formats(tiny_llama, tmp_path, suffix):
    import pandas as pd

    frame = pd.DataFrame({"text": ["the movie was", "it was"]})
    path = tmp_path / f"prompts.{suffix}"
    {"csv": lambda: frame.to_csv(path, index=False), "parquet": lambda: frame.to_parquet(path),
     "json": lambda: frame.to_json(path, orient="records")}[suffix]()
    dm = _setup(str(path), tiny_llama, prompt_field="text", batch_size=2)
    assert sorted(e["prompt"] for e in dm.examples) == ["it was", "the movie was"]


def test_jsonl_rows_become_columns_without_importing_datasets(tmp_path):
    import json
    import subprocess
    import sys

    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": "the movie was", "answer": "good"}, {"prompt": "it was"}, {"prompt": "my day", "id": 3}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    script = (
        "import sys; from lit_rlhf.data import load_table; "
        f"print(load_table({str(path)!r}, 'train')); print('datasets' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    # a key missing from a row is None there (a missing prompt is then refused with its row, as for other formats)
    assert out[0] == str({"prompt": ["the movie was", "it was", "my day"], "answer": ["good", None, None],
                          "id": [None, None, 3]})
    assert out[1] == "False"  # the datasets import alone is ~80 MB of resident memory


def test_saved_dataset_folder_and_chat_template(tiny_llama, tmp_path):
    import datasets

    datasets.Dataset.from_dict({"prompt": ["the movie was", "it was"]}).save_to_disk(str(tmp_path / "ds"))
    dm = _setup(str(tmp_path / "ds"), tiny_llama, batch_size=2, apply_chat_template=True, shuffle=False)
    assert len(dm.examples) == 2 and len(dm.examples[0]["input_ids"]) == 3


def test_empty_data_set(tiny_llama, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match=r"empty.jsonl.* is empty: it holds no rows"):
        _setup(str(path), tiny_llama)


def test_missing_prompt_field(tiny_llama, prompts_file):
    with pytest.raises(ValueError, match="data.prompt_field='prompt' is not a column.*'question'"):
        _setup(prompts_file(["a", "b"], field="question"), tiny_llama, batch_size=2)


def test_missing_file(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        _setup(str(tmp_path / "nope.jsonl"), tiny_llama)


def test_fewer_prompts_than_batch_size(tiny_llama, prompts_file):
    with pytest.raises(ValueError, match="fewer than data.batch_size=4"):
        _setup(prompts_file(["a", "b"]), tiny_llama, batch_size=4)


def test_prompt_longer_than_allowed(tiny_llama, prompts_file):
    path = prompts_file(["the movie was very good", "it was"])
    with pytest.raises(ValueError, match="more than data.max_prompt_length=3.*truncate_prompts"):
        _setup(path, tiny_llama, batch_size=2, max_prompt_length=3)
    dm = _setup(path, tiny_llama, batch_size=2, max_prompt_length=3, truncate_prompts=True)
    assert max(len(e["input_ids"]) for e in dm.examples) == 3


def test_truncation_keeps_the_chat_template_and_the_reward_sees_the_cut_text(tmp_path, prompts_file):
    from lit_rlhf.tiny import build_word_tokenizer, save_tiny_checkpoint

    path = save_tiny_checkpoint(tmp_path / "model")
    tokenizer = build_word_tokenizer()
    tokenizer.chat_template = (
        "<bos> you told me {{ messages[0]['content'] }} <eos>{% if add_generation_prompt %} i{% endif %}"
    )
    tokenizer.save_pretrained(path)
    long_prompt = "the movie was very good and the music was great"
    data = prompts_file([long_prompt, "it was"])
    dm = _setup(data, str(path), batch_size=2, max_prompt_length=9, truncate_prompts=True, apply_chat_template=True,
                shuffle=False)
    cut = dm.examples[0]
    assert cut["prompt"] == "music was great"  # the start of the text went, not the start of the template
    assert tokenizer.convert_ids_to_tokens(cut["input_ids"]) == [
        "<bos>", "you", "told", "me", "music", "was", "great", "<eos>", "i",
    ]
    assert dm.examples[1]["prompt"] == "it was"
    batch = next(iter(dm.train_dataloader()))
    assert batch["prompts"] == ["music was great", "it was"]  # what the reward function and model receive
    with pytest.raises(ValueError, match="leaves no room for the prompt text"):
        PromptDataModule(data, tokenizer=str(path), batch_size=2, max_prompt_length=6, truncate_prompts=True,
                         apply_chat_template=True).setup("fit")
