"""Text games: transitions, termination, invalid actions, splits, first-move scoring, play."""

from __future__ import annotations

import random

import pytest

from opcd.config import TaskConfig
from opcd.errors import ConfigError
from opcd.tasks import build_task
from opcd.tasks.episodes import conversation_messages, episode_summary
from opcd.tasks.games import (
    ACTIONS,
    FrozenLakeEpisode,
    GameTask,
    SokobanEpisode,
    frozenlake_distance,
    parse_action,
    random_frozenlake,
    random_sokoban,
    sokoban_solve_length,
)

# S F H
# F H F
# F F G   -> the only way: down, down, right, right
LAKE = ("SFH", "FHF", "FFG")

# A 6x6 room; player P at (2,1), box B at (2,2), target T at (2,4).
ROOM = (
    "######",
    "#____#",
    "#PB_T#",
    "#____#",
    "#____#",
    "######",
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[up]", "up"),
        ("I think [LEFT] is bad, so [ down ]", "down"),
        ("move: [Right].", "right"),
        ("down", None),
        ("[north]", None),
        ("", None),
    ],
)
def test_parse_action(text: str, expected: str | None) -> None:
    assert parse_action(text) == expected


# --------------------------------------------------------------------------- FrozenLake


def test_frozenlake_reaches_goal() -> None:
    ep = FrozenLakeEpisode(LAKE)
    assert "P _ O" in ep.observation_text() and "Moves left: 5" in ep.observation_text()
    results = [ep.step(f"[{a}]") for a in ("down", "down", "right", "right")]
    assert [r.done for r in results] == [False, False, False, True]
    assert results[-1].success and ep.success and not results[-1].invalid
    assert "reached the goal" in results[-1].observation
    with pytest.raises(RuntimeError, match="over"):
        ep.step("[up]")


def test_frozenlake_hole_ends_the_episode() -> None:
    ep = FrozenLakeEpisode(LAKE)
    ep.step("[down]")
    obs, done, success, invalid = ep.step("[right]")  # (1,1) is a hole
    assert done and not success and not invalid
    assert "fell into a hole" in obs and ep.optimal_moves() is None


def test_frozenlake_edge_keeps_position_and_move_limit_ends() -> None:
    ep = FrozenLakeEpisode(LAKE)
    obs, done, _, _ = ep.step("[up]")
    assert ep.pos == (0, 0) and "edge" in obs and not done
    for _ in range(3):
        assert not ep.step("[left]").done
    last = ep.step("[left]")
    assert last.done and not last.success and ep.moves == 5
    assert "used all your moves" in last.observation


def test_invalid_actions_are_counted_and_use_a_move() -> None:
    ep = FrozenLakeEpisode(LAKE)
    for i in range(5):
        obs, done, success, invalid = ep.step("I would like to go south please")
        assert invalid and not success
        assert done == (i == 4)
    assert ep.invalid_moves == 5 and ep.moves == 5 and ep.pos == (0, 0)
    assert ep.actions == [None] * 5
    assert "no valid action" in obs


def test_frozenlake_distance_and_layouts() -> None:
    assert frozenlake_distance(LAKE, (0, 0)) == 4
    assert frozenlake_distance(("SHF", "HFF", "FFG"), (0, 0)) is None
    rng = random.Random(0)
    for _ in range(50):
        layout = random_frozenlake(rng)
        assert layout[0][0] == "S" and layout[2][2] == "G"
        assert sum(row.count("H") for row in layout) == 2
        assert frozenlake_distance(layout, (0, 0)) == 4


# --------------------------------------------------------------------------- Sokoban


def test_sokoban_push_box_onto_target() -> None:
    ep = SokobanEpisode(ROOM)
    assert ep.optimal_moves() == 2
    first = ep.step("[right]")
    assert "pushed the box right" in first.observation and not first.done
    assert ep.box == (2, 3) and ep.player == (2, 2)
    obs, done, success, _ = ep.step("[right]")
    assert done and success and "onto the target" in obs
    assert "*" in ep.render()


def test_sokoban_walls_block_player_and_box() -> None:
    ep = SokobanEpisode(ROOM)
    obs, *_ = ep.step("[left]")  # (2,0) is a wall
    assert "into a wall" in obs and ep.player == (2, 1)
    # Box against the top wall: bring the player below the box, then push up twice.
    ep2 = SokobanEpisode(("######", "#____#", "#_B__#", "#_P_T#", "#____#", "######"))
    ep2.step("[up]")  # pushes the box to row 1
    assert ep2.box == (1, 2)
    obs, done, success, invalid = ep2.step("[up]")  # wall behind the box
    assert "wall is behind it" in obs and ep2.box == (1, 2) and ep2.player == (2, 2)
    assert not done and not success and not invalid


def test_sokoban_move_limit_and_invalid() -> None:
    ep = SokobanEpisode(ROOM)
    ep.step("nonsense")
    ep.step("[up]")
    ep.step("[down]")
    ep.step("[left]")
    last = ep.step("[up]")
    assert last.done and not last.success and ep.invalid_moves == 1 and ep.moves == 5


def test_sokoban_solver_and_layouts() -> None:
    walls = frozenset(
        (r, c) for r in range(6) for c in range(6) if r in (0, 5) or c in (0, 5)
    )
    assert sokoban_solve_length(walls, (2, 1), (2, 2), (2, 4)) == 2
    assert sokoban_solve_length(walls, (2, 1), (1, 1), (2, 4)) is None  # box in a corner
    rng = random.Random(1)
    for _ in range(30):
        layout = random_sokoban(rng)
        assert len(layout) == 6 and all(len(row) == 6 for row in layout)
        assert "".join(layout).count("B") == 1 and "".join(layout).count("T") == 1
        assert 2 <= SokobanEpisode(layout).optimal_moves() <= 5


# --------------------------------------------------------------------------- the task


def _task(game: str, seed: int = 0) -> GameTask:
    return GameTask(game, sizes={"train": 40, "eval": 8, "test": 16}, seed=seed)


@pytest.mark.parametrize("game", ["frozenlake", "sokoban"])
def test_splits_are_deterministic_and_disjoint(game: str) -> None:
    a, b = _task(game), _task(game)
    for split, size in (("train", 40), ("eval", 8), ("test", 16)):
        assert len(a.examples(split)) == size
        assert a.examples(split) == b.examples(split)
    ids = [e.id for s in a.splits for e in a.examples(s)]
    assert len(ids) == len(set(ids))
    layouts = [tuple(e.meta["layout"]) for e in _task(game, seed=5).examples("test")]
    assert layouts != [tuple(e.meta["layout"]) for e in a.examples("test")]
    if game == "sokoban":  # Sokoban splits never share a layout
        per_split = [{tuple(e.meta["layout"]) for e in a.examples(s)} for s in a.splits]
        assert sum(map(len, per_split)) == len(set().union(*per_split)) == 64
    with pytest.raises(ConfigError, match="Unknown split 'dev'"):
        a.examples("dev")


def test_build_task_games() -> None:
    task = build_task(TaskConfig(name="frozenlake", test_size=128, train_size=3, eval_size=2))
    assert task.multi_turn and len(task.examples("test")) == 128
    ex = task.examples("test")[0]
    assert ex.prompt.startswith("You are playing FrozenLake")
    assert "[up], [down], [left] or [right]" in ex.prompt
    assert task.new_episode(ex).first_prompt() == ex.prompt


def _best_action(task: GameTask, example, episode) -> str:
    """A breadth-first-search policy: the first action on a shortest winning path."""
    for action in ACTIONS:
        probe = task.new_episode(example)
        for past in episode.actions:
            probe.step(f"[{past}]" if past else "??")
        before = probe.optimal_moves()
        r = probe.step(f"[{action}]")
        if r.success or (probe.optimal_moves() is not None and probe.optimal_moves() == before - 1):
            return action
    raise AssertionError("no winning move")


@pytest.mark.parametrize("game", ["frozenlake", "sokoban"])
def test_first_move_score(game: str) -> None:
    task = _task(game)
    ex = task.examples("eval")[0]
    best = _best_action(task, ex, task.new_episode(ex))
    assert task.score(ex, f"Let me think. [{best}]") == 1.0
    assert task.score(ex, "no idea") == 0.0
    assert task.invalid_first_moves == 1
    details = task.score_details([ex, ex], [f"[{best}]", "??"])
    assert details["score"] == 0.5 and details["invalid_moves"] == 1.0


def test_first_move_into_a_hole_scores_zero() -> None:
    task = _task("frozenlake")
    ex = next(e for e in task.examples("train") if e.meta["layout"][0][1] == "H")
    assert task.score(ex, "[right]") == 0.0
    assert task.score_details([ex], ["[right]"])["losing_moves"] == 1.0


@pytest.mark.parametrize("game", ["frozenlake", "sokoban"])
def test_play_with_scripted_policies(game: str) -> None:
    task = _task(game)
    examples = task.examples("test")[:6]

    def solver(batch):
        """Replay the conversation's moves on a fresh episode, then play the best move."""
        replies = []
        for messages in batch:
            ex = next(e for e in examples if e.prompt == messages[0]["content"])
            ep = task.new_episode(ex)
            for m in messages[1:]:
                if m["role"] == "assistant":
                    ep.step(m["content"])
            replies.append(f"I will move [{_best_action(task, ex, ep)}]")
        return replies

    won = task.play(examples, solver)
    assert all(r.success for r in won)
    assert task.summary(won)["success_rate"] == 1.0
    turns = won[0].turns
    # The first prompt, then (reply, observation) pairs; the last observation tells the outcome.
    assert [role for role, _ in turns] == ["user"] + ["assistant", "user"] * won[0].moves
    assert turns[0][1] == examples[0].prompt
    assert "you won" in turns[-1][1]

    lost = task.play(examples[:2], lambda batch: ["hmm"] * len(batch))
    assert not any(r.success for r in lost)
    assert all(r.invalid_moves == r.moves == 5 for r in lost)
    summary = episode_summary(lost)
    assert summary["invalid_moves"] == 10.0 and summary["success_rate"] == 0.0


def test_play_with_context_shows_the_experience() -> None:
    task = _task("frozenlake")
    seen = []

    def policy(batch):
        seen.extend(batch)
        return ["[up]"] * len(batch)

    task.play(task.examples("eval")[:1], policy, with_context=True)
    assert seen[0][0]["role"] == "user"
    assert seen[0][0]["content"].startswith("Rules or strategies learned so far")
    assert "EXPERIENCE ITEM" in seen[0][0]["content"]
    assert len(seen) == 5 and len(seen[-1]) == 9  # user + 4 x (assistant, user)


def test_conversation_messages() -> None:
    turns = [("user", "board"), ("assistant", "[up]"), ("user", "board 2")]
    assert conversation_messages(turns) == [
        {"role": "user", "content": "board"},
        {"role": "assistant", "content": "[up]"},
        {"role": "user", "content": "board 2"},
    ]
    system = conversation_messages(turns, context="tips", placement="system")
    assert system[0] == {"role": "system", "content": "tips"} and len(system) == 4
    user = conversation_messages(turns, context="tips {prompt}", placement="user",
                                 user_template="<{context}>\n{prompt}")
    assert user[0]["content"] == "<tips {prompt}>\nboard"  # the context is not a template
    assert user[1:] == system[2:]
    with pytest.raises(ValueError, match="alternate"):
        conversation_messages([("user", "a"), ("user", "b")])
