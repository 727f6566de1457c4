"""The in-training score of every scored step and the best one, in `<workdir>/best.json`.

    {"metric": "fid10000", "best_step": 50000, "best": 3.21, "best_checkpoint": ".../ckpts/50000.ckpt",
     "history": [{"step": 25000, "fid10000": 4.02, ...}, ...], "final_evaluation": {...}}

The score is FID (`fid<N>`, N = config.sample.intermediate_n_samples) or, for digits, the classifier report's
`frechet_distance_digits`; lower is better, and the best step is the lowest (the earliest of equal ones). The main
process writes the file atomically after each score; on resume it is read and shared with every process, so the
history continues: entries after the resumed checkpoint (left by a run that went further than its last readable
checkpoint) are dropped and will be scored again, the others are kept and never recomputed.
"""
import json
import logging
import os

from libs.config import ConfigError
from libs.distributed import broadcast_from_main
from libs.files import write_json

__all__ = ['ScoreHistory', 'FILE_NAME']

log = logging.getLogger(__name__)
FILE_NAME = 'best.json'


class ScoreHistory:
    """Scores of `metric` by step; identical on every process, written by the main one. `ckpt_root` holds the
    checkpoints `<step>.ckpt` the scores are of."""

    def __init__(self, workdir, ckpt_root, metric, is_main):
        self.path, self.metric, self.is_main = os.path.join(workdir, FILE_NAME), metric, is_main
        self.ckpt_root = ckpt_root
        saved = None
        if is_main and os.path.isfile(self.path):
            with open(self.path) as f:
                saved = json.load(f)
        saved = broadcast_from_main(saved)
        self.entries, self.final = {}, None
        if saved is not None:
            if saved.get('metric') != metric:
                raise ConfigError(
                    f"{self.path} holds the history of {saved.get('metric')!r} but this run scores {metric!r} (a "
                    "changed config.sample.intermediate_n_samples?): restore the setting, or move the file away to "
                    "start a new history")
            self.entries = {int(e['step']): e for e in saved.get('history', [])}
            self.final = saved.get('final_evaluation')

    def resume(self, step):
        """Forget what was scored after `step` (the checkpoint the run resumes from)."""
        later = sorted(s for s in self.entries if s > step)
        if later:
            log.info('%s: dropping the scores of steps %s (after the resumed checkpoint %d); they will be made again',
                     self.path, later, step)
            for s in later:
                del self.entries[s]
            self.final = None
            self._write()

    def __contains__(self, step):
        return step in self.entries

    def points(self):
        return sorted((s, e[self.metric]) for s, e in self.entries.items())

    @property
    def best_step(self):
        if not self.entries:
            return None
        return min(self.entries, key=lambda s: (self.entries[s][self.metric], s))

    @property
    def best(self):
        return None if self.best_step is None else self.entries[self.best_step][self.metric]

    def add(self, step, scores):
        """Record `scores` (a dict holding the metric) of `step`."""
        self.entries[step] = {'step': step, **scores}
        self.final = None
        self._write()

    def set_final(self, evaluation):
        """Record the final evaluation of the best checkpoint (a dict)."""
        self.final = evaluation
        self._write()

    def _write(self):
        if not self.is_main:
            return
        best = self.best_step
        write_json(self.path, {
            'metric': self.metric, 'best_step': best, 'best': self.best,
            'best_checkpoint': None if best is None else os.path.abspath(os.path.join(self.ckpt_root, f'{best}.ckpt')),
            'history': [self.entries[s] for s in sorted(self.entries)], 'final_evaluation': self.final})
