"""The jobs beyond DPO, by `config.job` name."""

from jaxdpo.jobs import demo as demo_job
from jaxdpo.jobs import evaluate as eval_job
from jaxdpo.jobs import mine
from jaxdpo.jobs import ref_logps as ref_logps_job
from jaxdpo.jobs import sft as sft_job

JOBS = {"sft": sft_job.run, "eval": eval_job.run, "mine": mine.run, "demo": demo_job.run, "ref_logps": ref_logps_job.run}
