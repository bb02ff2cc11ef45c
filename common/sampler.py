"""Batch order for mixed-resolution training: plain shuffled batches, or length-grouped ones that pad less.

Neither sampler buckets: every sample keeps its own size, batches may mix sizes, and each epoch visits every
sample exactly once (only `drop_last` drops the one short batch). Grouping just places samples of similar token
count next to each other, so the padded batch wastes fewer slots.

Multi-process training: each step's *global* batch of `batch_size * num_replicas` indices is built first, the
same on every rank (same seed, same epoch, no communication), and rank r takes the r-th contiguous slice of it.
The global batches depend only on (lengths, batch_size * num_replicas, seed, epoch, window), so the union of the
ranks' slices at each step is the same for any number of processes: 2 processes with batch_size=B see exactly the
samples of 1 process with batch_size=2B, step by step. A short final global batch (no `drop_last`) is split as
evenly as possible; if it holds fewer than num_replicas samples, the last ranks get an empty batch on that step.

Token budgets (`TokenBudgetBatchSampler`, `--max_tokens_per_batch`): batches hold as many samples as fit in a
budget of real tokens instead of a fixed count; steps are formed the same way on every rank.

Resume: `state_dict()` is {"epoch", "batches_done"}; after `load_state_dict`, the next iteration continues at
batch `batches_done` of the same epoch order. As with `DistributedSampler`, call `set_epoch(epoch)` before each
epoch (calling it with the epoch already set keeps a loaded resume point).
"""

from collections.abc import Iterable, Iterator, Sequence
from math import prod

import torch
from torch.utils.data import Sampler

from common.errors import UserError
from common.padding import padding_ratio


def mean_padding_ratio(batches: Iterable[list[int]], lengths: Sequence[int]) -> float:
    """Mean over non-empty batches of the share of padded token slots, to compare batch orders by wasted compute."""
    ratios = [padding_ratio([lengths[i] for i in batch]) for batch in batches if batch]
    return sum(ratios) / len(ratios) if ratios else 0.0


class RandomBatchSampler(Sampler[list[int]]):
    """Shuffled batches of indices (the default order), resumable and split across ranks as described above."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        """lengths: token count of each sample (for the padding report; grouping also orders by it)."""
        if batch_size < 1 or num_replicas < 1:
            raise ValueError(f"batch_size and num_replicas must be >= 1, got {batch_size} and {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.lengths = [int(n) for n in lengths]
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._resume_at = 0  # batches to skip at the start of the next iteration (set by load_state_dict)
        self._batches_done = 0

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step over all ranks."""
        return self.batch_size * self.num_replicas

    def _order(self, generator: torch.Generator) -> list[list[int]]:
        """This epoch's global batches, in order; only the last one may be short."""
        perm = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.global_batch_size
        return [perm[i : i + size] for i in range(0, len(perm), size)]

    def global_batches(self) -> list[list[int]]:
        """The current epoch's global batches (identical on every rank), after drop_last."""
        batches = self._order(torch.Generator().manual_seed(self.seed + self.epoch))
        if self.drop_last and batches and len(batches[-1]) < self.global_batch_size:
            batches.pop()
        return batches

    def _rank_slice(self, batch: list[int], rank: int) -> list[int]:
        """Rank's contiguous share of a global batch: exactly batch_size of a full one, near-equal of a short one."""
        share, extra = divmod(len(batch), self.num_replicas)
        start = rank * share + min(rank, extra)
        return batch[start : start + share + (rank < extra)]

    def steps(self) -> list[list[list[int]]]:
        """The current epoch's steps, each as every rank's batch (identical on every rank)."""
        return [[self._rank_slice(b, r) for r in range(self.num_replicas)] for b in self.global_batches()]

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's batches of the current epoch, from the resume point on."""
        start, self._resume_at = self._resume_at, 0
        self._batches_done = start
        for step in self.steps()[start:]:
            self._batches_done += 1
            yield step[self.rank]

    def __len__(self) -> int:
        """Batches (= steps) in a full epoch, the same on every rank."""
        full, rest = divmod(len(self.lengths), self.global_batch_size)
        return full + (rest > 0 and not self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields; a new epoch starts at its first batch."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._resume_at = self._batches_done = 0

    def state_dict(self, batches_done: int | None = None) -> dict[str, int]:
        """Resume point; batches_done defaults to batches handed out, pass the trained count if a loader prefetches."""
        return {"epoch": self.epoch, "batches_done": self._batches_done if batches_done is None else batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at batch state["batches_done"] of epoch state["epoch"] on the next iteration."""
        self.epoch = state["epoch"]  # first: the epoch decides len() for token-budget batches
        if not 0 <= state["batches_done"] <= len(self):
            raise ValueError(f"batches_done={state['batches_done']} outside [0, {len(self)}]")
        self._resume_at = self._batches_done = state["batches_done"]

    def padding_ratio(self) -> float:
        """Mean padding ratio of the batches all ranks pad this epoch (same value on every rank), for logging."""
        return mean_padding_ratio((batch for step in self.steps() for batch in step), self.lengths)


class LengthGroupedBatchSampler(RandomBatchSampler):
    """`--group_by_length`: shuffled batches of similar token counts, cut from length-sorted random windows.

    Each epoch: shuffle all indices, cut them into windows of `window_batches` global batches, sort each window by
    token count (longest first), cut it into global batches, then shuffle the order of the full batches so the epoch
    does not run long-to-short per window (the short tail batch, if any, stays last). Larger windows pad less but
    make batch composition less random; the window of 64 batches reaches a few percent (see bench/padding_ratio.py).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        window_batches: int = 64,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        """window_batches: global batches per sorted window, i.e. a window of window_batches * global_batch_size."""
        super().__init__(lengths, batch_size, seed=seed, drop_last=drop_last, num_replicas=num_replicas, rank=rank)
        if window_batches < 1:
            raise ValueError(f"window_batches must be >= 1, got {window_batches}")
        self.window_batches = window_batches

    def _order(self, generator: torch.Generator) -> list[list[int]]:
        """Length-sorted windows cut into global batches, full batches shuffled, the short one (if any) last."""
        perm = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.global_batch_size
        window = self.window_batches * size
        batches = []
        for w in range(0, len(perm), window):
            ordered = sorted(perm[w : w + window], key=lambda i: -self.lengths[i])  # stable: ties stay shuffled
            batches += [ordered[i : i + size] for i in range(0, len(ordered), size)]
        tail = [batches.pop()] if batches and len(batches[-1]) < size else []
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()] + tail


class TokenBudgetBatchSampler(RandomBatchSampler):
    """`--max_tokens_per_batch`: each rank's micro-batch takes samples in order while their real tokens (target +
    references + text) fit in `max_tokens`, so every step does about the same work whatever the mix of sizes.

    Each epoch: the sample order (shuffled, or with `group_by_length` sorted inside random windows of about
    `window_batches` global batches, as `LengthGroupedBatchSampler` does) is cut greedily into batches within the
    budget; every `num_replicas` consecutive batches form one step, rank r taking the r-th. All ranks compute the
    same steps, so every rank runs the same number of micro-batches. A short last step is merged with the step
    before it and the batches holding the most samples are halved until both steps are full (halves stay within
    the budget); only with fewer samples than ranks does a rank get an empty batch, as with `RandomBatchSampler`.
    `drop_last` drops the short step instead.
    The number of steps depends on the epoch's order; `len()` is that of the current epoch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        *,
        tokens: Sequence[int] | None = None,
        group_by_length: bool = False,
        window_batches: int = 64,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        """lengths: image tokens (for the padding report, as the other samplers); tokens: real tokens each sample
        costs (default: lengths); max_tokens: budget of one rank's micro-batch."""
        super().__init__(lengths, 1, seed=seed, drop_last=drop_last, num_replicas=num_replicas, rank=rank)
        self.tokens = [int(n) for n in (lengths if tokens is None else tokens)]
        if len(self.tokens) != len(self.lengths):
            raise ValueError(f"{len(self.tokens)} token counts for {len(self.lengths)} samples")
        longest = max(range(len(self.tokens)), key=self.tokens.__getitem__, default=None)
        if longest is not None and self.tokens[longest] > max_tokens:
            raise UserError(
                f"--max_tokens_per_batch {max_tokens} is smaller than sample {longest} "
                f"({self.tokens[longest]} tokens); give at least that"
            )
        if window_batches < 1:
            raise ValueError(f"window_batches must be >= 1, got {window_batches}")
        self.max_tokens = max_tokens
        self.group_by_length = group_by_length
        mean = sum(self.tokens) / max(len(self.tokens), 1)
        self.window = max(1, round(window_batches * num_replicas * max_tokens / max(mean, 1)))  # samples per window
        self._steps: tuple[int, list[list[list[int]]]] | None = None  # (epoch, its steps)

    def _pack(self, order: list[int]) -> list[list[int]]:
        """Consecutive samples of `order` cut into batches of at most max_tokens real tokens."""
        batches, batch, used = [], [], 0
        for i in order:
            if batch and used + self.tokens[i] > self.max_tokens:
                batches.append(batch)
                batch, used = [], 0
            batch.append(i)
            used += self.tokens[i]
        return batches + ([batch] if batch else [])

    def _fill(self, batches: list[list[int]], count: int) -> list[list[int]]:
        """`count` batches from `batches`: halve the batch with the most samples until there are enough (halves stay
        within the budget); empty batches only if there are fewer samples than `count`."""
        batches = list(batches)
        while len(batches) < count:
            largest = max(range(len(batches)), key=lambda k: len(batches[k]))
            if len(batches[largest]) < 2:
                return batches + [[]] * (count - len(batches))
            batch = batches.pop(largest)
            batches[largest:largest] = [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
        return batches

    def steps(self) -> list[list[list[int]]]:
        """The current epoch's steps, each as every rank's batch (identical on every rank, computed once)."""
        if self._steps is not None and self._steps[0] == self.epoch:
            return self._steps[1]
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.tokens), generator=generator).tolist()
        if self.group_by_length:
            windows = [order[w : w + self.window] for w in range(0, len(order), self.window)]
            order = [i for window in windows for i in sorted(window, key=lambda i: -self.tokens[i])]
        batches = self._pack(order)
        replicas = self.num_replicas
        steps = [batches[k : k + replicas] for k in range(0, len(batches), replicas)]
        tail = steps.pop() if steps and len(steps[-1]) < replicas else []
        if tail and not self.drop_last:
            # The short last step and the full one before it become two full steps (one if there is no other).
            tail = self._fill((steps.pop() if steps else []) + tail, replicas * (2 if len(batches) > replicas else 1))
        if self.group_by_length:  # not long-to-short inside each window; the last steps stay last
            steps = [steps[k] for k in torch.randperm(len(steps), generator=generator).tolist()]
        if not self.drop_last:
            steps += [tail[k : k + replicas] for k in range(0, len(tail), replicas)]
        self._steps = (self.epoch, steps)
        return steps

    def global_batches(self) -> list[list[int]]:
        """The current epoch's global batches: each step's rank batches concatenated."""
        return [[i for batch in step for i in batch] for step in self.steps()]

    def __len__(self) -> int:
        """Steps in the current epoch, the same on every rank."""
        return len(self.steps())


def collate_ragged(rows: list[dict]) -> dict:
    """Per-key lists of the rows' values, unpadded (padding happens in the model forward and the loss only).

    Adds "lengths", each sample's image token count (sum over its (frames, h, w) entries), when rows carry
    "img_shapes", so the trainer and the loss know the real sizes without inspecting tensors.
    """
    batch = {key: [row[key] for row in rows] for key in rows[0]} if rows else {}
    if "img_shapes" in batch:
        batch["lengths"] = [sum(prod(int(d) for d in shape) for shape in shapes) for shapes in batch["img_shapes"]]
    return batch
