"""The jobs beyond DPO, by `config.job` name."""

from jaxdpo import eval_job, mine
from jaxdpo.sft import job as sft_job

JOBS = {"sft": sft_job.run, "eval": eval_job.run, "mine": mine.run}
