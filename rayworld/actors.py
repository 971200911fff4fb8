"""Ray wiring the stages share: keeping actors busy, ending env actors, and task errors that
deserve one line."""

from __future__ import annotations

import ray


def close_and_kill(actors, timeout_s: float = 15.0):
    """End a stage's env actors: close their envs (a CARLA server gets its settings and world
    back), then kill them. A dead or stuck actor does not hold the stage up beyond timeout_s."""
    refs = [a.close.remote() for a in actors]
    try:
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    finally:
        for actor in actors:
            ray.kill(actor)


def task_result(ref, one_line: tuple):
    """ray.get; a task error of one of the `one_line` types is raised as itself (its message says
    all), anything else as Ray raises it, with the task's traceback."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, one_line):
            raise e.cause from None
        raise


def keep_busy(actors, jobs, submit, depth: int = 1, on_death=None):
    """Run every job on a pool of actors, `depth` queued on each so none waits on the driver.

    `submit(actor, job)` starts a job and returns its ObjectRef. Yields (job, ref) as each
    finishes; the actor that ran it gets the next job. Ray's ActorPool keeps one job per actor
    and hides the refs, which one-line error handling (`task_result`) needs.
    on_death(actor, job): with it, a job whose actor died is called in, then redone by a live
    actor, and the dead one gets no more work; only when every actor is dead does the error
    reach the caller.
    """
    todo = list(jobs)[::-1]
    live = list(actors)
    pending = {}
    for actor in live * depth:
        if todo:
            job = todo.pop()
            pending[submit(actor, job)] = (actor, job)
    turn = 0
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        actor, job = pending.pop(done[0])
        if on_death is not None and _died(done[0]):
            if actor in live:
                live.remove(actor)
            if not live:
                ray.get(done[0])  # raises the actor's death
            on_death(actor, job)
            turn += 1
            heir = live[turn % len(live)]
            pending[submit(heir, job)] = (heir, job)
            continue
        if todo:
            nxt = todo.pop()
            pending[submit(actor, nxt)] = (actor, nxt)
        yield job, done[0]


def _died(ref) -> bool:
    try:
        ray.get(ref)
    except ray.exceptions.RayActorError:
        return True
    except Exception:  # the caller's ray.get raises it
        return False
    return False
