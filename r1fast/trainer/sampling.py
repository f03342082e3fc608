"""Rejection sampling (R1 §2.3.3): n samples per prompt, keep those whose rewards pass the thresholds.

The kept rows ({prompt, completion, <the dataset's other columns>, rewards}) are the SFT data of
the next stage; sampled from a teacher and trained into a smaller model they are distillation data.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Optional, Sequence

from r1fast._umask import fsync_dir, fsync_file
from r1fast.data.loading import (check_columns, check_prompts, continues_answer, decode_completion, encode_prompts,
                                 prefilled_think, resolve_stop_tokens, stop_token_ids, warn_unstopped_turn_end)
from r1fast.rewards import RewardSet
from r1fast.trainer.common import (check_answer_column, check_model_and_tokenizer, check_prompt_room,
                                   check_reward_keywords, dataset_rows, model_from_argument, reward_columns,
                                   reward_completions)
from r1fast.trainer.config import ConfigError, SampleConfig, folder_obstacle
from r1fast.trainer.metrics import replacing, writing


def rejection_sample(model, tokenizer=None, rows=None, cfg: Optional[SampleConfig] = None, *,
                     progress: Optional[bool] = None,
                     should_stop: Optional[Callable[[], bool]] = None,
                     resume_from: Optional[dict] = None,
                     on_batch: Optional[Callable[[list[dict], dict], None]] = None,
                     stop_option: str = "stop_tokens") -> tuple[list[dict], dict]:
    """→ (kept rows, statistics). After each batch of prompts `on_batch` is given the rows it kept and
    the statistics so far, holding `next_prompt` (SampleProgress.append keeps them), and `should_stop`
    is asked: when it says yes, the statistics returned hold `next_prompt` too. `resume_from`
    ({"next_prompt", "rows", "stats"} of a stopped or killed call: SampleProgress.load) continues there.
    Each batch's seed depends on its position alone, so the continued call keeps what the uninterrupted
    one would.
    As the trainers: `model` may be a name (loaded with cfg's device, dtype and seed, its tokenizer with it) and
    `rows` a list of dicts, a datasets.Dataset, a path / builtin:<task>, or None (cfg.dataset). `stop_option`:
    the option that gave cfg.stop_tokens, named by the errors and warnings (a pipeline's `<stage>.stop_tokens`).
    `progress`: whether to show a progress bar; None follows cfg.progress_bar."""
    from r1fast.rollout import Engine, SamplingParams

    cfg = SampleConfig() if cfg is None else cfg
    if not isinstance(cfg, SampleConfig):
        raise TypeError(f"rejection sampling: cfg must be a SampleConfig, got {type(cfg).__name__}")
    cfg.validate()
    progress = cfg.progress_bar if progress is None else progress
    if isinstance(rows, list) and not rows:
        raise ValueError("rejection sampling: the prompt dataset is empty")
    # the data before the model: a wrong path is said before a large model has loaded
    rows = dataset_rows(rows if rows is not None else cfg.dataset, "rejection sampling: prompt",
                        split=cfg.dataset_split, seed=cfg.seed)
    model, tokenizer = model_from_argument(model, tokenizer, cfg)
    check_model_and_tokenizer(model, tokenizer, "rejection sampling")
    check_columns(rows, (cfg.prompt_column,), "rejection sampling: dataset", {cfg.prompt_column: "prompt_column"})
    rows = rows[:] if cfg.max_prompts < 0 else rows[:cfg.max_prompts]   # a slice: FileRows keep their lines
    check_prompts(rows, cfg.prompt_column, tokenizer, cfg.system_prompt, "rejection sampling: dataset",
                  cfg.chat_template_kwargs)
    rewards = RewardSet(cfg.reward_funcs, format_pattern=cfg.format_pattern, language=cfg.language,
                        timeout=cfg.reward_timeout)
    check_answer_column(rewards.names, rows, cfg.answer_column, "prompt dataset")
    warn_unanswered_prompts(rewards.names, rows, cfg.answer_column, "prompt dataset")
    check_reward_keywords(rows, cfg.prompt_column, "prompt dataset")
    thresholds = cfg.reward_thresholds or [1.0] * len(rewards)
    prompt_ids = encode_prompts(tokenizer, rows, cfg.prompt_column, cfg.system_prompt,
                                chat_template_kwargs=cfg.chat_template_kwargs, where="rejection sampling: dataset")
    check_prompt_room(prompt_ids, model.config.max_sequence_length, "rejection sampling")
    # Capped at the model's positions, as in GRPO and evaluation: a sample reaching it ends as "length".
    max_model_len = min(model.config.max_sequence_length, max(map(len, prompt_ids)) + cfg.max_completion_length)
    extra_stops = resolve_stop_tokens(tokenizer, cfg.stop_tokens, stop_option)
    stops = stop_token_ids(tokenizer, extra=extra_stops)
    ends = stop_token_ids(tokenizer, model.eos_token_ids, extra_stops)   # the engine stops at the model's eos too
    warn_unstopped_turn_end(tokenizer, ends, stop_option, cfg.chat_template_kwargs)
    engine = Engine(model, max_num_seqs=max(256, cfg.num_samples), max_model_len=max_model_len)
    # a template that opens <think> for the model (R1-Distill's): its samples start inside the block. The kept
    # completion is the assistant's whole turn, opening included, so a student whose template does not open
    # it learns to (SFT leaves it out again for a template that does).
    opening = prefilled_think(tokenizer, cfg.chat_template_kwargs)
    kept: list[dict] = list(resume_from["rows"]) if resume_from else []
    done = resume_from["stats"] if resume_from else {}
    n_total, n_pass, n_cut = done.get("samples", 0), done.get("passed", 0), done.get("truncated", 0)
    # of them, those the model's positions cut before max_completion_length (prompt + completion reached them)
    n_cut_by_positions = done.get("truncated_by_positions", 0)
    # samples no reward function scored (accuracy's None for a row without an answer, and no other reward): left out
    n_unscored = done.get("unscored", 0)
    positions = model.config.max_sequence_length
    prompts_with_any = done.get("prompts_kept", 0)
    first = resume_from["next_prompt"] if resume_from else 0
    stopped_at = None
    model.eval()
    bar = None
    if progress:
        from r1fast.progress import progress as progress_bar

        # the prompts sampled before a resume as the start, not as done now: they made the rate and time left wrong
        bar = progress_bar(len(rows), "sample", unit="prompts", initial=first)
    # closed however the loop ends: a Ctrl-C or a failing reward function left a log without the line saying
    # where sampling stopped, and a terminal's bar unfinished, the traceback written on after it
    try:
        for start in range(first, len(rows), cfg.batch_prompts):
            chunk = rows[start:start + cfg.batch_prompts]
            params = SamplingParams(n=cfg.num_samples, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                    max_tokens=cfg.max_completion_length, stop_token_ids=stops,
                                    seed=(cfg.seed * 1_000_003 + start) % (2**31 - 1))
            results = engine.generate(prompt_ids[start:start + len(chunk)], params)
            texts, ids, owners, cut, by_positions = [], [], [], [], []
            for i, res in enumerate(results):
                for comp in res.completions:
                    texts.append(decode_completion(tokenizer, comp.token_ids, ends))
                    ids.append(list(comp.token_ids))
                    owners.append(i)
                    cut.append(comp.finish_reason == "length")
                    # the engine ends a sequence at max_model_len: before max_completion_length, the model's positions
                    reached = len(prompt_ids[start + i]) + len(comp.token_ids) >= max_model_len
                    by_positions.append(cut[-1] and reached and len(comp.token_ids) < cfg.max_completion_length)
            prompts = [chunk[i][cfg.prompt_column] for i in owners]
            columns = reward_columns(chunk, owners, cfg.prompt_column, cfg.answer_column)
            # the same arguments as in GRPO: a reward function written for `r1fast train` works here
            table = rewards.score(prompts, reward_completions(prompts, texts), columns, completion_ids=ids)
            per_prompt: dict[int, list[dict]] = {}
            seen: dict[int, set] = {}
            for j, text in enumerate(texts):
                n_total += 1
                n_cut += cut[j]
                n_cut_by_positions += by_positions[j]
                # SFT appends eos to a completion: one cut at max_completion_length would teach stopping mid-thought
                if cut[j] and not cfg.keep_truncated:
                    continue
                values = [t[j] for t in table]
                if all(v is None for v in values):
                    # no reward says it is right: taken as passing every threshold, it was kept and counted in the pass
                    # rate as if correct
                    n_unscored += 1
                    continue
                # a reward that cannot score it (None) is left out of its check: judged by the others, as documented
                if not all(v is None or v >= th for v, th in zip(values, thresholds)):
                    continue
                n_pass += 1
                i = owners[j]
                if text in seen.setdefault(i, set()) or len(per_prompt.get(i, [])) >= cfg.keep_per_prompt:
                    continue
                seen[i].add(text)
                row = {k: v for k, v in chunk[i].items() if k != "completion"}
                row["completion"] = ("" if continues_answer(chunk[i][cfg.prompt_column]) else opening) + text
                row["rewards"] = dict(zip(rewards.names, values))
                per_prompt.setdefault(i, []).append(row)
            prompts_with_any += len(per_prompt)
            batch = [row for i in sorted(per_prompt) for row in per_prompt[i]]
            kept.extend(batch)
            if on_batch is not None:
                on_batch(batch, {**_statistics(len(rows), n_total, (n_cut, n_cut_by_positions, positions), n_pass,
                                               len(kept), prompts_with_any, n_unscored),
                                   "next_prompt": start + len(chunk)})
            if bar is not None:
                bar.set_postfix(pass_rate=f"{n_pass / max(n_total, 1):.2f}", kept=len(kept))
                bar.update(len(chunk))
            if should_stop is not None and should_stop() and start + len(chunk) < len(rows):
                stopped_at = start + len(chunk)
                break
    finally:
        if bar is not None:
            bar.close()
    stats = _statistics(len(rows), n_total, (n_cut, n_cut_by_positions, positions), n_pass, len(kept), prompts_with_any,
                        n_unscored)
    if stopped_at is not None:
        stats["next_prompt"] = stopped_at
    return kept, stats


def _statistics(prompts: int, samples: int, cut: tuple[int, int, int], passed: int, kept: int,
                prompts_kept: int, unscored: int = 0) -> dict:
    """`cut`: (samples cut without a stop token, those of them the model's positions cut, the model's positions).
    `unscored`: samples left out as no reward function scored them."""
    truncated, by_positions, positions = cut
    stats = {"prompts": prompts, "samples": samples, "truncated": truncated, "passed": passed,
             "pass_rate": passed / max(samples, 1), "kept": kept, "prompts_kept": prompts_kept}
    if by_positions:   # only then: the statistics of every other sampling stay as an earlier r1fast wrote them
        stats.update(truncated_by_positions=by_positions, positions=positions)
    if unscored:   # likewise
        stats["unscored"] = unscored
    return stats


def summary(stats: dict) -> str:
    """One line for the console from rejection_sample's statistics."""
    cut = stats.get("truncated")   # none in a pipeline_state.json of an r1fast before keep_truncated
    unscored = stats.get("unscored")
    return (f"kept {stats['kept']} of {stats['samples']} samples from {stats['prompts']} prompts (pass rate "
            f"{stats['pass_rate']:.3f}" + (f"; {_cut_where(stats)}" if cut else "")
            + (f"; {unscored} left out unscored: no reward function could score them" if unscored else "") + ")")


def unanswered_prompts(reward_names: Sequence[str], rows: Sequence[dict], answer_column: str) -> list[int]:
    """The rows the accuracy reward finds no reference answer in (None, NaN, empty: it scores their samples None),
    read as it reads them: `answer_column`, else `solution`; none when accuracy is not among the rewards."""
    from r1fast.data.loading import row_name
    from r1fast.rewards.builtin import row_golds

    if "accuracy" not in reward_names:
        return []
    return [i for i, row in enumerate(rows)
            if not (row_golds(row.get(answer_column), f"{row_name(rows, i)}: column {answer_column!r}")
                    or row_golds(row.get("solution"), f"{row_name(rows, i)}: column 'solution'"))]


def check_answers_given(reward_names: Sequence[str], rows: Sequence[dict], answer_column: str, where: str):
    """A dataset whose answer column holds no answer at all (every row null or empty) is refused, as one without
    the column is (check_answer_column): every sample was kept on the other rewards alone, or, with accuracy alone,
    every sample as if correct (pass rate 1.000)."""
    from r1fast.data.loading import source_name

    missing = unanswered_prompts(reward_names, rows, answer_column)
    if rows and len(missing) == len(rows):
        either = " or 'solution'" if answer_column == "answer" and "solution" in rows[0] else ""
        raise ValueError(f"reward 'accuracy' has no reference answer to check samples against: column "
                         f"{answer_column!r} (option 'answer_column'){either} is empty (null) in all {len(rows)} "
                         f"prompts of the {where}{source_name(rows)}; give the answers, set answer_column to the "
                         f"column that holds them, or leave accuracy out of reward_funcs")


def warn_unanswered_prompts(reward_names: Sequence[str], rows: Sequence[dict], answer_column: str, where: str):
    """check_answers_given, and a warning for some rows without an answer: their samples are judged by the other
    rewards alone (or, with accuracy alone, left out), which the output's `rewards` showed only as a null."""
    import warnings

    from r1fast.data.loading import row_name

    check_answers_given(reward_names, rows, answer_column, where)
    missing = unanswered_prompts(reward_names, rows, answer_column)
    if not missing:
        return
    others = [name for name in reward_names if name != "accuracy"]
    fate = (f"are judged by the other rewards alone ({', '.join(others)}): drop those rows to keep verified answers "
            f"only" if others else "are left out: no other reward scores them")
    have = "has" if len(missing) == 1 else "have"
    warnings.warn(f"{len(missing)} of the {len(rows)} prompts of the {where} {have} no reference answer in column "
                  f"{answer_column!r} (the first: {row_name(rows, missing[0])}): reward 'accuracy' cannot score their "
                  f"samples, which {fate}", stacklevel=3)


def _cut_where(stats: dict) -> str:
    """"N cut at max_completion_length", or what cut them where the model's positions (max_position_embeddings, or
    a smaller sliding window) ended some first: "cut at max_completion_length" sent the user to raise it in vain."""
    cut, by_positions = stats["truncated"], stats.get("truncated_by_positions", 0)
    at_positions = f"where prompt and completion reached the model's {stats.get('positions')} positions"
    if not by_positions:
        return f"{cut} cut at max_completion_length"
    if by_positions == cut:
        return f"{cut} cut {at_positions}"
    return f"{cut} cut: {cut - by_positions} at max_completion_length, {by_positions} {at_positions}"


def _json_value(value):
    """A dataset value JSON has no type for, as JSON: dates and times as ISO text, numpy scalars and
    arrays as numbers and lists, anything else as its text (parquet and HF datasets carry them)."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", "replace")
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)


def check_output_file(path: str, where: str = "output_file", read: Sequence[tuple[Any, str]] = ()):
    """An output JSONL that cannot be written, found before sampling: write_jsonl found it once every prompt
    was sampled, and the rows were lost. The folders it lacks write_jsonl makes. `read`: (path, what it is) of the
    data read before the samples are written (the prompts; a pipeline's earlier stages' datasets), which the
    output must not replace. `where`: the option, after what holds it ("r1.yaml: stage 'rs': output_file")."""
    option = where.rpartition(": ")[2]
    for spec, what in read:
        # by name too: a pipeline's file an earlier sample stage writes is not there yet on its first run, which
        # loaded, and was refused on --resume once that stage had written it
        if isinstance(spec, str) and (os.path.realpath(spec) == os.path.realpath(path) or os.path.isfile(spec)
                                      and os.path.exists(path) and os.path.samefile(spec, path)):
            # the samples replaced the prompts they were drawn from (or a pipeline's cold-start data), without a word
            raise ConfigError(f"{where} {path!r} is {what} {spec!r}: writing the samples would replace it; give "
                              f"another {option}")
    # "runs/new/" (a folder not made yet): the samples were written to a hidden "runs/new/.tmp" and the rename over
    # "runs/new/" failed with "Not a directory", once every prompt was sampled
    if os.path.isdir(path) or path.endswith(("/", os.sep)) or os.path.basename(path) in ("", ".", ".."):
        raise ConfigError(f"{where} {path!r} is a folder; name the JSONL file to write "
                          f"(e.g. {os.path.join(path, 'samples.jsonl')!r})")
    if os.path.exists(path) and not os.path.isfile(path):   # /dev/null: replaced by a regular file at the end
        raise ConfigError(f"{where} {path!r} is not a regular file (a device, pipe or socket): the samples are "
                          f"written to a new file renamed over it, which would replace it; name a JSONL file")
    if os.path.islink(path) and not os.path.isdir(os.path.dirname(os.path.realpath(path))):
        # written where the link leads (metrics.replacing), into a folder that is not there: failed at the end
        raise ConfigError(f"{where} {path!r} is a symlink to {os.readlink(path)!r}, whose folder does not exist; "
                          f"make it, or give another {option}")
    obstacle = folder_obstacle(os.path.dirname(os.path.abspath(path)))   # the folders write_jsonl makes
    if obstacle:
        raise ConfigError(f"{where} {path!r}: {obstacle}; give another {option}")


def write_jsonl(rows: Sequence[dict], path: str) -> dict:
    """→ {"rows", "bytes", "sha256"} of the file written (what a finished sampling's record checks it by)."""
    import hashlib

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with replacing(path) as f:   # half the rows are never left as the output file
        for r in rows:
            line = json.dumps(r, ensure_ascii=False, default=_json_value) + "\n"
            data = line.encode("utf-8")
            f.write(line)
            digest.update(data)
            size += len(data)
    return {"rows": len(rows), "bytes": size, "sha256": digest.hexdigest()}


# The progress of a rejection sampling, kept as it goes so that any kill (Ctrl-C, SIGTERM, SIGKILL, out of
# memory, a node failure) loses at most the batch of prompts it was sampling; a pipeline's sample stage keeps
# it in <stage folder>/sample_progress.json, `r1fast sample` beside its output (progress_path(output_file)).
# One JSON record a line, each appended, flushed and synced: the first {"r1fast_sample_progress": 2,
# "fingerprint"}, then one per batch of prompts with the rows it kept, the next prompt and the running
# statistics. Appending, not rewriting every row kept so far after each batch (quadratic in the run's length).
SAMPLE_PROGRESS = "sample_progress.json"
_PROGRESS_FORMAT = 2   # 1: one JSON object written when stopped ({"fingerprint", "next_prompt", "stats", "rows"})


def progress_path(output_file: str) -> str:
    """Where `r1fast sample` keeps a stopped run's progress: beside its output, one file per output."""
    return f"{output_file}.{SAMPLE_PROGRESS}"


def sample_fingerprint(options: dict, prompts: list, settings: dict) -> str:
    """The sampling's options, prompts and settings (model, dtype, device, seed): a stopped sampling's
    kept rows continue only the same sampling."""
    import hashlib

    # stop_tokens unset: the fingerprint an r1fast before the option gave, so such a stopped sampling continues.
    # reward_timeout changes no value a reward returns, only whether a slow call stops the run: a sampling stopped
    # by a RewardTimeout continues with the raised limit its error asks for (and one from before the option too)
    options = {k: v for k, v in options.items()
               if k not in ("progress_bar", "reward_timeout") and not (k == "stop_tokens" and v is None)}
    return hashlib.sha256(json.dumps([options, prompts, settings], sort_keys=True, default=str).encode()).hexdigest()


# weights_signature's reads of each weights file: evenly spaced pieces, so that its cost is the same for a 2 KB
# test model and a 60 GB shard (a hash of the whole file took minutes before the first prompt of a --resume)
_SIGNATURE_PIECES, _SIGNATURE_PIECE_BYTES = 32, 4096
# and a piece of each tensor's values, at its middle: a LoRA merged into a few projections changes small tensors only,
# which the evenly spaced pieces missed (a third of a 0.5B model's shard or more lies between two of them)
_TENSOR_PIECE_BYTES = 256
# a safetensors header longer than this is no header (its first 8 bytes are its length): not parsed for tensor pieces
_MAX_HEADER_BYTES = 100 << 20


def weights_signature(model_name_or_path: str) -> Optional[str]:
    """What changes when a local model folder's weights change: its config.json, and of each weights file the
    loader reads (_weights_files) the size, pieces read at evenly spaced places and a piece of each tensor's values
    (_tensor_middles). A model retrained into the same folder has files of the same names and sizes (and the same
    safetensors header), so the pieces are of the tensors' values; a copy of the folder (cp without -p: new modification times) keeps the signature. None where it is no
    folder (builtin:<size>, seeded)."""
    import hashlib

    if not os.path.isdir(model_name_or_path):
        return None
    digest = hashlib.sha256()
    names = ["config.json"] if os.path.isfile(os.path.join(model_name_or_path, "config.json")) else []
    names = sorted(names + _weights_files(model_name_or_path))
    for name in names:
        path = os.path.join(model_name_or_path, name)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            digest.update(f"{name}\0{size}\0".encode())
            if name == "config.json" or size <= _SIGNATURE_PIECES * _SIGNATURE_PIECE_BYTES:
                digest.update(f.read())
                continue
            for i in range(_SIGNATURE_PIECES):   # the first piece at the file's start, the last at its end
                f.seek(i * (size - _SIGNATURE_PIECE_BYTES) // (_SIGNATURE_PIECES - 1))
                digest.update(f.read(_SIGNATURE_PIECE_BYTES))
            for start in _tensor_middles(f, size):
                f.seek(start)
                digest.update(f.read(_TENSOR_PIECE_BYTES))
    return digest.hexdigest()


def _weights_files(folder: str) -> list[str]:
    """The names of the weights files the loader reads from `folder` (checkpoint.shard_files): model*.safetensors
    alone missed a folder whose weights are consolidated.safetensors (no model.safetensors, no index), which kept its
    signature when retrained in place. Where the loader would refuse the folder, its model*.safetensors (the load
    then says why)."""
    from r1fast.models.checkpoint import shard_files

    try:
        return [os.path.relpath(p, folder) for p in shard_files(folder)]  # an index may name a subfolder's
    except (OSError, ValueError):
        return [n for n in os.listdir(folder) if n.startswith("model") and n.endswith(".safetensors")]


def _tensor_middles(f, size: int) -> list[int]:
    """Where weights_signature reads a piece of each tensor of the safetensors file `f` (`size` bytes): at the middle
    of its values, by the file's header; none for a file whose header does not read as one (the loader says why)."""
    f.seek(0)
    length = int.from_bytes(f.read(8), "little")
    if not 0 < length <= min(_MAX_HEADER_BYTES, size - 8):
        return []
    try:
        header = json.loads(f.read(length))
        spans = [info["data_offsets"] for name, info in header.items() if name != "__metadata__"]
        starts = sorted(8 + length + (int(begin) + int(end) - _TENSOR_PIECE_BYTES) // 2 for begin, end in spans)
    except (ValueError, TypeError, KeyError, AttributeError):
        return []
    return [max(8 + length, start) for start in starts]


class _Unreadable(ValueError):
    pass


class SampleProgress:
    """The progress file of one sampling (`fingerprint`: sample_fingerprint). `load` reads what a stopped or
    killed run of it kept; `append` (rejection_sample's `on_batch`) records each batch of prompts, after the
    loaded records or, when none were loaded, in a file started over."""

    def __init__(self, path: str, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint
        self._continues = False   # True once the file holds this sampling's header and records to append to

    def append(self, rows: list[dict], stats: dict):
        """One batch of prompts: the rows it kept, and `stats` (holding `next_prompt`) after it."""
        lines = [] if self._continues else [json.dumps({"r1fast_sample_progress": _PROGRESS_FORMAT,
                                                        "fingerprint": self.fingerprint})]
        totals = {k: v for k, v in stats.items() if k != "next_prompt"}
        lines.append(json.dumps({"next_prompt": stats["next_prompt"], "stats": totals, "rows": rows},
                                ensure_ascii=False, default=_json_value))
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        with writing(self.path), open(self.path, "a" if self._continues else "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            fsync_file(f.fileno())   # on disk before the next batch: a node failure keeps it too
        if not self._continues:
            fsync_dir(folder)     # the new file's name too
            self._continues = True

    @property
    def holds_batches(self) -> bool:
        """Whether the file holds batches of this sampling (loaded, or appended by this run): a file of another
        sampling (other options, which load set aside) is started over by the first append, so keeps nothing."""
        return self._continues

    def stopped(self, kept: list[dict], stats: dict, who: str) -> str:
        """The line that says a sampling stopped after a batch of prompts (`stats` hold `next_prompt`)."""
        return (f"interrupted {who} after {stats['next_prompt']} of {stats['prompts']} prompts ({len(kept)} samples "
                f"kept so far, in {self.path})")

    def load(self, who: str) -> Optional[dict]:
        """What a stopped or killed run of this sampling kept: rejection_sample's `resume_from`
        ({"next_prompt", "rows", "stats"}), appended to from then on; else None, said: the sampling starts
        from its first prompt (and the file over)."""
        if not os.path.exists(self.path):
            return None
        try:
            progress = self._read()
            n, rows = progress["next_prompt"], len(progress["rows"])
            total = progress["stats"]["prompts"] if n else None
        except (OSError, ValueError, KeyError, TypeError) as e:
            why = f"cannot be read ({e})"
        else:
            why = ("is for other options or prompts" if progress["fingerprint"] != self.fingerprint
                   else "holds no finished batch of prompts" if n == 0 else None)
        if why is not None:
            print(f"r1fast: --resume: {who}: what its stopped run kept ({self.path}) {why}: it samples from its "
                  f"first prompt", file=sys.stderr, flush=True)
            return None
        self._continues = True
        if n >= total:   # killed between its last batch and writing the output
            print(f"r1fast: --resume: {who} sampled all {total} prompts before it stopped ({rows} samples kept)",
                  flush=True)
        else:
            print(f"r1fast: --resume: {who} continues from prompt {n + 1} of {total} ({rows} samples kept before)",
                  flush=True)
        return progress

    def _read(self) -> dict:
        """The file as load's result ({"fingerprint", "next_prompt", "stats", "rows"}), left ready to append to
        when its fingerprint is this sampling's."""
        with open(self.path, "rb") as f:
            data = f.read()
        progress = self._older_format(data)
        if progress is not None:
            if progress["fingerprint"] == self.fingerprint:
                self._rewrite(progress)   # in this format, to append to
            return progress
        if b"\n" not in data:   # killed writing its first batch of prompts
            return {"fingerprint": self.fingerprint, "next_prompt": 0, "stats": {}, "rows": []}
        return self._records(data)

    @staticmethod
    def _older_format(data: bytes) -> Optional[dict]:
        """A progress file of an r1fast before _PROGRESS_FORMAT 2 (one object, written when stopped), as load's
        result; None for this format."""
        try:
            progress = json.loads(data)
        except ValueError:
            return None   # this format's records, one a line (or a damaged file, which _records names)
        if not (isinstance(progress, dict) and "rows" in progress and "fingerprint" in progress):
            return None
        return _checked_progress(progress["fingerprint"], progress)

    def _rewrite(self, progress: dict):
        with replacing(self.path) as f:
            f.write(json.dumps({"r1fast_sample_progress": _PROGRESS_FORMAT, "fingerprint": self.fingerprint}) + "\n")
            f.write(json.dumps({k: progress[k] for k in ("next_prompt", "stats", "rows")}, ensure_ascii=False) + "\n")

    def _records(self, data: bytes) -> dict:
        """The header and batch records of `data`, this format's file. A last line a kill cut short is left out
        and cut off (the next record starts a line of its own), as is a damaged line and all after it, said."""
        lines = data.split(b"\n")
        complete = lines[:-1]   # the piece after the last newline was cut short mid-write (or is empty)
        header = _progress_header(complete[0] if complete else b"")
        if header.get("r1fast_sample_progress") != _PROGRESS_FORMAT:
            raise _Unreadable(f"format {header.get('r1fast_sample_progress')!r}, not {_PROGRESS_FORMAT}: resume "
                              f"it with the r1fast that wrote it")
        progress = {"fingerprint": header["fingerprint"], "next_prompt": 0, "stats": {}, "rows": []}
        end = len(complete[0]) + 1
        for number, line in enumerate(complete[1:], start=2):
            try:
                record = _checked_progress(header["fingerprint"], _json_line(line, number))
                if record["next_prompt"] <= progress["next_prompt"]:
                    raise _Unreadable(f"line {number}: next_prompt {record['next_prompt']} does not follow "
                                      f"{progress['next_prompt']}")
            except (_Unreadable, KeyError, TypeError) as e:
                print(f"r1fast: --resume: {self.path}: {e}: it and the lines after it are left out", file=sys.stderr,
                      flush=True)
                break
            progress.update(next_prompt=record["next_prompt"], stats=record["stats"])
            progress["rows"].extend(record["rows"])
            end += len(line) + 1
        if header["fingerprint"] == self.fingerprint and end < len(data):
            os.truncate(self.path, end)   # the next append starts on a line of its own
        return progress


def _progress_header(line: bytes) -> dict:
    """The object a progress file's first line holds, with its fingerprint: this format's header, or a format-1
    file's one object (any format number: the caller checks it)."""
    header = _json_line(line, 1)
    if not isinstance(header, dict) or "fingerprint" not in header:
        raise _Unreadable("its first line is not an r1fast sample progress header")
    return header


def _json_line(line: bytes, number: int):
    try:
        return json.loads(line)
    except ValueError as e:
        raise _Unreadable(f"line {number} is not JSON ({e})") from None


def _checked_progress(fingerprint: str, record) -> dict:
    """`record` (a batch record, or a format-1 file) as load's result, its fields checked."""
    if not isinstance(record, dict):
        raise _Unreadable(f"a record is a {type(record).__name__}, not an object")
    n, stats, rows = record["next_prompt"], record["stats"], record["rows"]
    if type(n) is not int or not isinstance(stats, dict) or not isinstance(rows, list):
        raise _Unreadable("a record's next_prompt, stats or rows is of the wrong type")
    return {"fingerprint": fingerprint, "next_prompt": n, "stats": stats, "rows": rows}


def finish_samples(kept: Sequence[dict], path: str, progress_file: str, record: Optional[dict] = None):
    """The whole output, then its record when `record` ({"fingerprint", "stats", "options"}: `r1fast sample`'s)
    is given, then the sampling's progress gone (a kill between any two resumes from the progress and writes
    the same output and record again)."""
    written = write_jsonl(kept, path)
    if record is not None:
        write_sample_record(path, {**record, **written})
    if os.path.exists(progress_file):
        os.remove(progress_file)


# The record of a finished `r1fast sample`, beside its output: <output_file>.sample_stats.json, one JSON object
# {"r1fast_sample_stats": 1, "output": <the output's file name>, "rows", "bytes", "sha256" (the output as written),
# "stats" (rejection_sample's: prompts, samples, truncated, passed, pass_rate, kept, prompts_kept), "options"
# (SampleConfig's), "fingerprint" (sample_fingerprint), "finished" (UTC, ISO 8601)}. Written whole (renamed over
# the last) after the output and before the progress file is removed: `--resume` of the same sampling over an
# output that still matches it (a Slurm requeue of a finished job) samples nothing.
SAMPLE_STATS = "sample_stats.json"
_STATS_FORMAT = 1


def stats_path(output_file: str) -> str:
    """Where `r1fast sample` records its finished output and statistics."""
    return f"{output_file}.{SAMPLE_STATS}"


def record_name_overflow(output_file: str) -> Optional[str]:
    """Why the record's file cannot be written beside `output_file` (its temporary name, the longest r1fast sample
    writes, is over the folder's limit on a name's bytes), else None: found once every prompt was sampled, the
    write failed with "File name too long" and left the progress file, which --resume sampled into the same end."""
    folder = os.path.dirname(os.path.abspath(output_file))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:   # write_jsonl makes the folders
        folder = os.path.dirname(folder)
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):   # no such query here (Windows)
        limit = 255
    # metrics.replacing's temporary name, with the longest process id (a requeued job's may be longer than this one's)
    temporary = f".{os.path.basename(stats_path(output_file))}.tmp-4194304-12345678"
    size = len(os.fsencode(temporary))
    if size <= limit:
        return None
    return (f"its name is too long for the record written beside it ({stats_path(output_file)!r}: a name of "
            f"{size} bytes while writing it; {limit} at most), by {size - limit} bytes")


def write_sample_record(output_file: str, record: dict):
    import datetime

    finished = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    order = ("rows", "bytes", "sha256", "stats", "options", "fingerprint")   # as the comment above lists them
    body = {"r1fast_sample_stats": _STATS_FORMAT, "output": os.path.basename(output_file),
            **{k: record[k] for k in order}, "finished": finished}
    text = json.dumps(body, indent=1, ensure_ascii=False, default=_json_value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:   # a file name of non-UTF-8 bytes (Python's surrogates): escaped, as JSON reads back
        text = json.dumps(body, indent=1, default=_json_value)
    with replacing(stats_path(output_file)) as f:
        f.write(text + "\n")


def finished_output(output_file: str, fingerprint: str) -> tuple[Optional[dict], Optional[str]]:
    """→ (its record, None) when `output_file` is the whole output of the sampling `fingerprint` names, as
    written; else (None, why not: a sentence naming `output_file`), or (None, None) when it has no record."""
    path = stats_path(output_file)
    if not os.path.exists(path):
        return None, None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if not isinstance(record, dict):
            raise TypeError(f"a {type(record).__name__}, not an object")
        missing = [key for key in ("fingerprint", "rows", "bytes", "sha256") if key not in record]
        if missing:
            raise KeyError(missing[0])
        summary(record["stats"])   # the line said of it: its statistics must make one
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"the record of a finished sampling of {output_file} ({path}) cannot be read ({e})"
    if record["fingerprint"] != fingerprint:
        return None, f"{output_file} was written by a sampling of other options or prompts (its record: {path})"
    if not os.path.isfile(output_file):
        return None, f"{output_file}, which a finished sampling wrote (its record: {path}), is gone"
    if os.path.getsize(output_file) != record["bytes"] or _file_sha256(output_file) != record["sha256"]:
        return None, (f"{output_file} has changed since the sampling wrote it ({record['rows']} rows, "
                      f"{record['bytes']} bytes; its record: {path})")
    return record, None


def _file_sha256(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def progress_fingerprint(progress_file: str) -> Optional[str]:
    """The fingerprint a progress file's first line names (either format), or None if it has none."""
    try:
        with open(progress_file, "rb") as f:
            return _progress_header(f.readline())["fingerprint"]
    except (OSError, _Unreadable):
        return None
