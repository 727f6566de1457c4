"""Training logs on the main process: a JSONL file, wandb (offline unless configured), loss and score curve plots."""
import json
import logging
import os

__all__ = ['setup_logging', 'MetricLog', 'plot_loss_curve', 'plot_score_curve']


def setup_logging(workdir, is_main):
    """Console + `<workdir>/output.log` on the main process; errors only elsewhere."""
    handlers = [logging.StreamHandler()]
    if is_main:
        handlers.append(logging.FileHandler(os.path.join(workdir, 'output.log')))
    logging.basicConfig(level=logging.INFO if is_main else logging.ERROR, handlers=handlers, force=True,
                        format='%(asctime)s %(levelname)s %(message)s', datefmt='%H:%M:%S')


class MetricLog:
    """Appends one JSON record per call to `<workdir>/log.jsonl` and mirrors it to wandb.

    wandb runs in WANDB_MODE (default 'offline', files under the workdir); 'disabled' turns it off.
    """

    def __init__(self, workdir, config, project, name):
        self.path = os.path.join(workdir, 'log.jsonl')
        open(self.path, 'a').close()
        self.wandb = None
        mode = os.environ.setdefault('WANDB_MODE', 'offline')
        if mode != 'disabled':
            import wandb
            self.wandb = wandb.init(project=project, name=name, dir=os.path.abspath(workdir), mode=mode,
                                    config=config.to_dict(), resume='allow', id=self._run_id(workdir))

    @staticmethod
    def _run_id(workdir):
        path = os.path.join(workdir, 'wandb_run_id.txt')
        if not os.path.exists(path):
            with open(path, 'w') as f:
                f.write(os.urandom(6).hex())
        with open(path) as f:
            return f.read().strip()

    def log(self, record, images=None):
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')
        if self.wandb is not None:
            extra = {k: self._wandb_image(v) for k, v in (images or {}).items()}
            self.wandb.log({**{k: v for k, v in record.items() if k != 'step'}, **extra}, step=record['step'])

    @staticmethod
    def _wandb_image(path):
        import wandb
        return wandb.Image(path)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(log_path, out_path):
    """Loss vs step from the JSONL log, written as a PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    records = [r for r in read_metrics(log_path) if 'loss' in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r['step'] for r in records], [r['loss'] for r in records], lw=1)
    ax.set_xlabel('step')
    ax.set_ylabel('training loss (eps MSE)')
    ax.set_yscale('log')
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def plot_score_curve(points, metric, best_step, out_path):
    """The in-training score (e.g. fid10000) vs step from [(step, value)], the best step marked, as a PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    steps, values = [p[0] for p in points], [p[1] for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, values, 'o-', lw=1, ms=3)
    if best_step is not None:
        ax.plot([best_step], [dict(points)[best_step]], 'r*', ms=12, label=f'best: step {best_step}')
        ax.legend()
    ax.set_xlabel('step')
    ax.set_ylabel(f'{metric} (EMA)')
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
