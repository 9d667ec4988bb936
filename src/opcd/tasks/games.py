"""Text games, played over several turns: FrozenLake (3x3) and Sokoban (6x6, one box).

As in the paper (after TextArena): a FrozenLake grid of 3x3 cells with the start fixed at
the top-left, the goal at the bottom-right and two holes whose places vary by seed; a
Sokoban room of 6x6 cells (walls around a 4x4 floor, up to two inner walls) with one box
and one target. At most :data:`MAX_MOVES` (5) moves per episode. Each turn the model
replies with one action, ``[up]``, ``[down]``, ``[left]`` or ``[right]`` (the last one in
the reply counts); the environment's observation (what happened, the grid, the moves
left) becomes the next user turn. Success = the goal reached / the box on its target.

FrozenLake's transitions come from gymnasium's ``FrozenLakeEnv`` (not slippery, with a
custom map); Sokoban is written here (no installable package fits: gym-sokoban needs the
old ``gym`` and rendering libraries). Every layout is checked solvable within the move
limit by breadth-first search; Sokoban layouts also need at least two moves.

Tasks ``frozenlake`` and ``sokoban`` (:class:`GameTask`): splits train / eval / test of
layouts drawn by seed (``task.seed`` and the split name). Sokoban splits never share a
layout. FrozenLake has only 19 solvable 3x3 maps with two holes, so its splits are
disjoint in seeds, not in maps (as in the paper, which evaluates on held-out seeds).

The multi-turn interface for a training loop: :meth:`GameTask.new_episode` and
:meth:`GameTask.play` (see :mod:`opcd.tasks.episodes`). For single-turn evaluation
(``opcd eval``), :meth:`GameTask.score` rates the *first move* of a reply: 1 when it is a
readable action on a shortest winning path, else 0 (a proxy; real success rates come from
:meth:`GameTask.play`).
"""

from __future__ import annotations

import random
import re
from collections import deque
from collections.abc import Sequence
from typing import Any

from opcd.errors import ConfigError
from opcd.tasks.base import Example, Placement, Task, derive_seed
from opcd.tasks.episodes import (
    BatchPolicy,
    Episode,
    EpisodeResult,
    Turn,
    conversation_messages,
    episode_summary,
    play_episodes,
)

MAX_MOVES = 5
ACTIONS = ("up", "down", "left", "right")
DELTAS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
_ACTION = re.compile(r"\[\s*(up|down|left|right)\s*\]", re.IGNORECASE)

GAME_TEMPLATE = (
    "Rules or strategies learned so far from earlier games (they are only a guess and may "
    "be wrong):\n{context}\n\nCurrent game:\n{prompt}"
)
"""The teacher's first user turn: the experience, then the current situation."""

FROZENLAKE_EXPERIENCE = "\n".join(
    [
        "- EXPERIENCE ITEM: The goal G is at the bottom-right: every winning route uses two "
        "[down] and two [right] moves.",
        "- EXPERIENCE ITEM: Before each move, find the cell you would enter; never enter an O.",
        "- EXPERIENCE ITEM: Moving against the edge of the grid wastes a move.",
        "- EXPERIENCE ITEM: Plan the whole route first; with 5 moves there is one spare.",
    ]
)

SOKOBAN_EXPERIENCE = "\n".join(
    [
        "- EXPERIENCE ITEM: To push the box one way, first stand next to it on the opposite "
        "side, then move towards it.",
        "- EXPERIENCE ITEM: A box pushed into a corner that is not the target can never be "
        "moved again: avoid it.",
        "- EXPERIENCE ITEM: Walking into a wall, or pushing the box into one, wastes a move.",
        "- EXPERIENCE ITEM: Plan the shortest route to the pushing position before moving.",
    ]
)

DEFAULT_SIZES = {"train": 512, "eval": 64, "test": 128}


def parse_action(text: str) -> str | None:
    """The last bracketed action in ``text`` (``[up]`` ... ``[right]``, any case), or None."""
    found = _ACTION.findall(text)
    return found[-1].lower() if found else None


def _step_pos(pos: tuple[int, int], action: str) -> tuple[int, int]:
    dr, dc = DELTAS[action]
    return pos[0] + dr, pos[1] + dc


# --------------------------------------------------------------------------- FrozenLake

FROZENLAKE_SIZE = 3
_FL_START = (0, 0)
_FL_GOAL = (FROZENLAKE_SIZE - 1, FROZENLAKE_SIZE - 1)
_FL_ACTION_IDS = {"left": 0, "down": 1, "right": 2, "up": 3}  # gymnasium's numbering


def frozenlake_distance(layout: Sequence[str], pos: tuple[int, int]) -> int | None:
    """Fewest moves from ``pos`` to the goal without entering a hole (None: unreachable)."""
    n = len(layout)
    if layout[pos[0]][pos[1]] == "H":
        return None
    seen = {pos: 0}
    queue = deque([pos])
    while queue:
        cur = queue.popleft()
        if layout[cur[0]][cur[1]] == "G":
            return seen[cur]
        for action in ACTIONS:
            r, c = _step_pos(cur, action)
            if 0 <= r < n and 0 <= c < n and (r, c) not in seen and layout[r][c] != "H":
                seen[(r, c)] = seen[cur] + 1
                queue.append((r, c))
    return None


def random_frozenlake(rng: random.Random, max_moves: int = MAX_MOVES) -> tuple[str, ...]:
    """A 3x3 map (gymnasium letters S, F, H, G) with two holes, solvable in ``max_moves``."""
    n = FROZENLAKE_SIZE
    cells = [(r, c) for r in range(n) for c in range(n) if (r, c) not in (_FL_START, _FL_GOAL)]
    while True:
        holes = set(rng.sample(cells, 2))
        rows = []
        for r in range(n):
            row = ""
            for c in range(n):
                row += "S" if (r, c) == _FL_START else "G" if (r, c) == _FL_GOAL else (
                    "H" if (r, c) in holes else "F"
                )
            rows.append(row)
        d = frozenlake_distance(rows, _FL_START)
        if d is not None and d <= max_moves:
            return tuple(rows)


class FrozenLakeEpisode(Episode):
    """FrozenLake on a fixed map; transitions by gymnasium's FrozenLakeEnv (not slippery)."""

    def __init__(self, layout: Sequence[str], max_moves: int = MAX_MOVES) -> None:
        super().__init__()
        from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv

        self.layout = tuple(layout)
        self.max_moves = max_moves
        self._env = FrozenLakeEnv(desc=list(self.layout), is_slippery=False)
        state, _ = self._env.reset(seed=0)
        self.n = len(self.layout)
        self.pos = divmod(int(state), self.n)

    def parse_action(self, text: str) -> str | None:
        return parse_action(text)

    def _apply(self, action: str) -> tuple[str, bool, bool]:
        state, _reward, terminated, _truncated, _info = self._env.step(_FL_ACTION_IDS[action])
        new = divmod(int(state), self.n)
        moved = new != self.pos
        self.pos = new
        cell = self.layout[new[0]][new[1]]
        if not moved:
            return f"You tried to move {action} but hit the edge of the grid and stayed put.", False, False
        if cell == "H":
            return f"You moved {action} and fell into a hole.", True, False
        if cell == "G":
            return f"You moved {action} and reached the goal!", True, True
        assert not terminated
        return f"You moved {action}.", False, False

    def render(self) -> str:
        symbols = {"S": "_", "F": "_", "H": "O", "G": "G"}
        rows = []
        for r, row in enumerate(self.layout):
            cells = ["P" if (r, c) == self.pos else symbols[ch] for c, ch in enumerate(row)]
            rows.append(" ".join(cells))
        where = f"You are at row {self.pos[0] + 1}, column {self.pos[1] + 1}."
        return "\n".join(rows) + "\n" + where

    def instructions(self) -> str:
        n = self.n
        return (
            f"You are playing FrozenLake on a {n}x{n} grid. Symbols: P = you, _ = frozen ice "
            "(safe), O = a hole, G = the goal. Reach G without stepping into a hole; falling "
            "into a hole ends the game. Moving off the grid leaves you where you are. Rows are "
            f"numbered 1 to {n} from the top, columns 1 to {n} from the left. You have at most "
            f"{self.max_moves} moves. Each turn, think briefly, then reply with exactly one "
            "action: [up], [down], [left] or [right]."
        )

    def optimal_moves(self) -> int | None:
        """Fewest moves to win from here (None: lost or impossible)."""
        if self.done and not self.success:
            return None
        return frozenlake_distance(self.layout, self.pos)


# --------------------------------------------------------------------------- Sokoban

SOKOBAN_SIZE = 6


def _sokoban_parse(layout: Sequence[str]) -> tuple[frozenset, tuple[int, int], tuple[int, int], tuple[int, int]]:
    walls, player, box, target = set(), None, None, None
    for r, row in enumerate(layout):
        for c, ch in enumerate(row):
            if ch == "#":
                walls.add((r, c))
            elif ch in "P+":
                player = (r, c)
            elif ch in "B*":
                box = (r, c)
            if ch in "T*+":
                target = (r, c)
    if player is None or box is None or target is None:
        raise ValueError("a Sokoban layout needs P (player), B (box) and T (target)")
    return frozenset(walls), player, box, target


def _sokoban_move(
    walls: frozenset, player: tuple[int, int], box: tuple[int, int], action: str
) -> tuple[tuple[int, int], tuple[int, int], str]:
    """``(player, box, outcome)``; outcome is ``moved``, ``pushed``, ``wall`` or ``blocked``."""
    nxt = _step_pos(player, action)
    if nxt in walls:
        return player, box, "wall"
    if nxt == box:
        beyond = _step_pos(box, action)
        if beyond in walls:
            return player, box, "blocked"
        return nxt, beyond, "pushed"
    return nxt, box, "moved"


def sokoban_solve_length(
    walls: frozenset, player: tuple[int, int], box: tuple[int, int], target: tuple[int, int],
    limit: int = MAX_MOVES,
) -> int | None:
    """Fewest moves to put the box on the target (None: not within ``limit``)."""
    start = (player, box)
    if box == target:
        return 0
    seen = {start: 0}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        depth = seen[state]
        if depth >= limit:
            continue
        for action in ACTIONS:
            p, b, _ = _sokoban_move(walls, state[0], state[1], action)
            if (p, b) in seen:
                continue
            if b == target:
                return depth + 1
            seen[(p, b)] = depth + 1
            queue.append((p, b))
    return None


def random_sokoban(
    rng: random.Random, max_moves: int = MAX_MOVES, min_moves: int = 2
) -> tuple[str, ...]:
    """A 6x6 room: walls around, up to two inner walls, one box, one target, the player;
    solvable in ``min_moves`` .. ``max_moves`` moves."""
    n = SOKOBAN_SIZE
    inner = [(r, c) for r in range(1, n - 1) for c in range(1, n - 1)]
    border = {(r, c) for r in range(n) for c in range(n) if r in (0, n - 1) or c in (0, n - 1)}
    while True:
        extra = set(rng.sample(inner, rng.choice((0, 1, 2))))
        free = [cell for cell in inner if cell not in extra]
        target, box, player = rng.sample(free, 3)
        walls = frozenset(border | extra)
        length = sokoban_solve_length(walls, player, box, target, max_moves)
        if length is None or length < min_moves:
            continue
        rows = []
        for r in range(n):
            row = ""
            for c in range(n):
                cell = (r, c)
                row += ("#" if cell in walls else "P" if cell == player else "B" if cell == box
                        else "T" if cell == target else "_")
            rows.append(row)
        return tuple(rows)


class SokobanEpisode(Episode):
    """Sokoban with one box: push it onto the target."""

    def __init__(self, layout: Sequence[str], max_moves: int = MAX_MOVES) -> None:
        super().__init__()
        self.layout = tuple(layout)
        self.max_moves = max_moves
        self.walls, self.player, self.box, self.target = _sokoban_parse(self.layout)

    def parse_action(self, text: str) -> str | None:
        return parse_action(text)

    def _apply(self, action: str) -> tuple[str, bool, bool]:
        self.player, self.box, outcome = _sokoban_move(self.walls, self.player, self.box, action)
        if outcome == "wall":
            return f"You tried to move {action} into a wall and did not move.", False, False
        if outcome == "blocked":
            return (
                f"You tried to push the box {action}, but a wall is behind it; nothing moved.",
                False,
                False,
            )
        if outcome == "pushed":
            if self.box == self.target:
                return f"You pushed the box {action} onto the target!", True, True
            return f"You pushed the box {action}.", False, False
        return f"You moved {action}.", False, False

    def render(self) -> str:
        rows = []
        for r in range(len(self.layout)):
            cells = []
            for c in range(len(self.layout[r])):
                cell = (r, c)
                if cell in self.walls:
                    cells.append("#")
                elif cell == self.player:
                    cells.append("+" if cell == self.target else "P")
                elif cell == self.box:
                    cells.append("*" if cell == self.target else "B")
                elif cell == self.target:
                    cells.append("T")
                else:
                    cells.append("_")
            rows.append(" ".join(cells))
        return "\n".join(rows)

    def instructions(self) -> str:
        return (
            f"You are playing Sokoban in a {SOKOBAN_SIZE}x{SOKOBAN_SIZE} room. Symbols: # = wall, "
            "_ = floor, P = you, B = the box, T = the target, * = the box on the target, "
            "+ = you standing on the target. Push the box onto the target. Walking into the "
            "box pushes it one cell in the same direction, unless a wall is behind it. You "
            "cannot pull the box or walk through walls. You have at most "
            f"{self.max_moves} moves. Each turn, think briefly, then reply with exactly one "
            "action: [up], [down], [left] or [right]."
        )

    def optimal_moves(self) -> int | None:
        """Fewest moves to win from here within the moves left (None: not possible)."""
        if self.done and not self.success:
            return None
        return sokoban_solve_length(
            self.walls, self.player, self.box, self.target, self.max_moves - self.moves
        )


# --------------------------------------------------------------------------- the task

GAMES = {
    "frozenlake": (FrozenLakeEpisode, random_frozenlake, FROZENLAKE_EXPERIENCE, False),
    "sokoban": (SokobanEpisode, random_sokoban, SOKOBAN_EXPERIENCE, True),
}
"""name -> (episode class, layout generator, default experience, splits disjoint in layouts)."""


class GameTask(Task):
    """A text game as a task: examples are layouts, contexts are experience, play is multi-turn."""

    placement: Placement = "user"
    user_template = GAME_TEMPLATE
    splits = ("train", "eval", "test")
    multi_turn = True

    def __init__(
        self,
        game: str,
        *,
        sizes: dict[str, int] | None = None,
        seed: int = 0,
        context: str | None = None,
        placement: Placement = "user",
        user_template: str | None = None,
        max_moves: int = MAX_MOVES,
    ) -> None:
        if game not in GAMES:
            raise ConfigError(f"Unknown game {game!r}; games: {', '.join(GAMES)}.")
        self.name = game
        self._episode_cls, self._generate_layout, default_experience, self._disjoint = GAMES[game]
        self.sizes = {**DEFAULT_SIZES, **(sizes or {})}
        for split, n in self.sizes.items():
            if n < 1:
                raise ConfigError(f"task.{split}_size={n} must be at least 1.")
        if max_moves < 1:
            raise ConfigError(f"max_moves={max_moves} must be at least 1.")
        self.seed = seed
        self.max_moves = max_moves
        self.experience = context if context is not None else default_experience
        if not self.experience.strip():
            raise ConfigError("task.context is empty; give the experience text, or leave it unset.")
        self.placement = placement
        self.user_template = user_template or GAME_TEMPLATE
        self._splits: dict[str, list[Example]] = {}
        self.invalid_first_moves = 0
        """Replies scored by :meth:`score` so far whose action could not be read."""

    # ------------------------------------------------------------------ examples

    def examples(self, split: str) -> list[Example]:
        self.check_split(split)
        if not self._splits:
            taken: set[tuple[str, ...]] = set()
            for name in ("test", "eval", "train"):
                self._splits[name] = self._make_split(name, taken)
        return self._splits[split]

    def _make_split(self, split: str, taken: set[tuple[str, ...]]) -> list[Example]:
        out = []
        index = 0
        while len(out) < self.sizes[split]:
            rng = random.Random(derive_seed(self.seed, self.name, split, index))
            index += 1
            layout = self._generate_layout(rng, self.max_moves)
            if self._disjoint:
                if layout in taken:
                    if index > 50 * self.sizes[split] + 1000:
                        raise ConfigError(
                            f"Could not draw {self.sizes[split]} distinct {self.name} layouts for "
                            f"the {split} split; lower task.{split}_size."
                        )
                    continue
                taken.add(layout)
            episode = self._episode_cls(layout, self.max_moves)
            out.append(
                Example(
                    id=f"{self.name}-{split}-{len(out):04d}",
                    prompt=episode.first_prompt(),
                    meta={
                        "game": self.name,
                        "layout": list(layout),
                        "optimal_moves": episode.optimal_moves(),
                    },
                )
            )
        return out

    # ------------------------------------------------------------------ episodes

    def new_episode(self, example: Example) -> Episode:
        """A fresh episode of ``example``'s layout (its first prompt is ``example.prompt``)."""
        return self._episode_cls(tuple(example.meta["layout"]), self.max_moves)

    def context(self, example: Example) -> str | None:
        return example.context if example.context is not None else self.experience

    def messages(
        self, example: Example, turns: Sequence[Turn], *, with_context: bool
    ) -> list[dict[str, str]]:
        """Chat messages for ``turns`` of ``example``'s episode: the student's
        (``with_context=False``) or the teacher's (the experience placed as configured)."""
        return conversation_messages(
            turns,
            context=self.context(example) if with_context else None,
            placement=self.placement,
            user_template=self.user_template,
        )

    def play(
        self, examples: Sequence[Example], policy: BatchPolicy, *, with_context: bool = False
    ) -> list[EpisodeResult]:
        """Play one episode per example to the end with ``policy`` (batched, lockstep).

        ``policy`` gets a batch of chat message lists and returns one reply per list.
        With ``with_context`` the policy sees the experience (the in-context reference).
        """
        if with_context and len({self.context(ex) for ex in examples}) > 1:
            # Per-example contexts: play each separately so each sees its own.
            results: list[EpisodeResult] = []
            for ex in examples:
                results.extend(self.play([ex], policy, with_context=True))
            return results
        context = self.context(examples[0]) if (with_context and examples) else None
        return play_episodes(
            [self.new_episode(ex) for ex in examples],
            [ex.id for ex in examples],
            policy,
            context=context,
            placement=self.placement,
            user_template=self.user_template,
        )

    # ------------------------------------------------------------------ single-turn scoring

    def first_move(self, example: Example, response: str) -> dict[str, Any]:
        """What ``response``'s first move does: readable, optimal, won, lost."""
        episode = self.new_episode(example)
        before = episode.optimal_moves()
        result = episode.step(response)
        after = episode.optimal_moves()
        optimal = (
            not result.invalid
            and before is not None
            and (result.success or (after is not None and after == before - 1))
        )
        return {
            "invalid": result.invalid,
            "optimal": bool(optimal),
            "won": result.success,
            "lost": result.done and not result.success,
        }

    def score(self, example: Example, response: str) -> float:
        """1 if the reply's action is a first move on a shortest winning path, else 0."""
        move = self.first_move(example, response)
        if move["invalid"]:
            self.invalid_first_moves += 1
        return float(move["optimal"])

    def score_details(self, examples: Sequence[Example], responses: Sequence[str]) -> dict[str, float]:
        """First-move figures: optimal rate, invalid replies, moves that lose at once."""
        if len(examples) != len(responses):
            raise ValueError(f"{len(examples)} examples but {len(responses)} responses")
        moves = [self.first_move(ex, r) for ex, r in zip(examples, responses, strict=True)]
        n = len(moves)
        return {
            "score": sum(m["optimal"] for m in moves) / n if n else 0.0,
            "n": float(n),
            "invalid_moves": float(sum(m["invalid"] for m in moves)),
            "losing_moves": float(sum(m["lost"] for m in moves)),
        }

    @staticmethod
    def summary(results: Sequence[EpisodeResult]) -> dict[str, float]:
        """Success rate and move statistics of played episodes."""
        return episode_summary(results)

    def describe(self) -> str:
        return f"{self.name} (multi-turn, at most {self.max_moves} moves)"
