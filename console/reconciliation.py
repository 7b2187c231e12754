"""Reads for the Reconciliation page and the health page's Stripe sync panel: job runs
(``JobRun``) and what the latest full reconcile run found, shaped for the templates."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.db.models import QuerySet
from django.urls import reverse

from payouts.models import JobRun, Payout, WebhookEvent
from payouts.services import jobs

Job = JobRun.Job
RunStatus = JobRun.Status
FINISHED = (RunStatus.OK, RunStatus.DRIFTED, RunStatus.FAILED, RunStatus.ABANDONED)
COMPLETED = (RunStatus.OK, RunStatus.DRIFTED)  # went through every payout it picked

# How each count reads ("one|many" where they differ); the first of each job is always
# shown, the others when not 0.
COUNT_WORDS = {
    Job.RECONCILE_PAYOUTS: [("checked", "checked"), ("drifted", "drifted"),
                            ("missing", "missing at Stripe"), ("applied", "applied"),
                            ("not_applied", "not applied"), ("errors", "error|errors")],
    Job.SYNC_EVENTS: [("accounts", "account|accounts"), ("listed", "event listed|events listed"),
                      ("new", "new"), ("applied", "applied"), ("held", "held"),
                      ("waiting", "waiting"), ("unchanged", "unchanged"),
                      ("malformed", "malformed"),
                      ("errors", "account not listed|accounts not listed")],
    Job.PRUNE: [("transaction_logs", "transaction log|transaction logs"),
                ("events", "event|events"), ("attempts", "attempt|attempts"),
                ("batches", "batch|batches")],
}


def last_runs(limit: int = 20) -> QuerySet[JobRun]:
    return JobRun.objects.select_related("requested_by").order_by("-started_at", "-id")[:limit]


@dataclass(frozen=True)
class JobSummary:
    job: str
    last: JobRun | None  # its newest run (running ones too; reconcile: full runs only)
    every_minutes: float | None  # how often workers run it; None: not scheduled


def last_run_of_each_job() -> list[JobSummary]:
    """Each job's newest run and schedule, for the health page. For reconcile_payouts,
    the newest full run: a Resync from Stripe of one payout says nothing of the others."""
    scheduled = jobs.intervals()  # none without STRIPE_API_KEY
    runs = JobRun.objects.select_related("requested_by").order_by("-started_at", "-id")
    return [JobSummary(Job.SYNC_EVENTS, runs.filter(job=Job.SYNC_EVENTS).first(),
                       _minutes(scheduled.get(Job.SYNC_EVENTS))),
            JobSummary(Job.RECONCILE_PAYOUTS,
                       runs.filter(job=Job.RECONCILE_PAYOUTS, scope="").first(),
                       _minutes(scheduled.get(Job.RECONCILE_PAYOUTS)))]


def _minutes(interval: timedelta | None) -> float | None:
    return interval.total_seconds() / 60 if interval is not None else None


def run_who(run: JobRun) -> str:
    """Who or what started a run: "scheduled", "command line", "console by alice"."""
    user = f"by {run.requested_by.get_username()}" if run.requested_by else ""
    if run.trigger == JobRun.Trigger.SCHEDULE:
        return "scheduled"
    if run.trigger == JobRun.Trigger.COMMAND:
        return " ".join(filter(None, ["command line", user]))
    return " ".join(filter(None, [run.trigger, user]))


def run_counts(run: JobRun) -> str:
    """A run's counts in words: "12 checked · 2 drifted · 2 applied"."""
    counts = run.counts or {}
    if not counts:
        return "—"
    words = COUNT_WORDS.get(run.job, [])
    parts = []
    for n, (key, label) in enumerate(words):
        value = counts.get(key, 0)
        if n == 0 or value:
            one, _, many = label.partition("|")
            parts.append(f"{value} {one if value == 1 or not many else many}")
    known = {key for key, _ in words}
    parts += [f"{value} {key.replace('_', ' ')}" for key, value in counts.items()
              if key not in known and value]
    return " · ".join(parts)


def run_duration(run: JobRun) -> str:
    seconds = run.duration
    if seconds is None:
        return "running" if run.status == RunStatus.RUNNING else "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s"


# --- what the latest full reconcile run found ------------------------------------------


@dataclass(frozen=True)
class FieldDrift:
    name: str
    ours: str
    stripe: str


@dataclass
class Finding:
    """One payout the run found drifted (or missing at Stripe), with its links."""

    payout_id: int
    stripe_payout_id: str
    account: str
    payout_url: str
    fields: list[FieldDrift] = field(default_factory=list)
    missing: bool = False
    applied: str = ""  # as recorded: "applied", "held: …", "marked for review", ""
    outcome: str = ""  # its first word, for the badge: applied, held, skipped, review…
    detail: str = ""  # the rest: the processor's reason
    event_id: str = ""  # the resync event's stripe_event_id
    event_url: str = ""  # its page, when it is stored
    payout: Payout | None = None  # the payout as it is now


def _outcome(applied: str) -> tuple[str, str]:
    if not applied:
        return "", ""
    if applied == "marked for review":
        return "review", "marked for review"
    kind, _, reason = applied.partition(":")
    return kind.strip(), reason.strip()


@dataclass
class Reconciliation:
    latest: JobRun | None  # the newest finished full run, whatever its status
    shown: JobRun | None  # the newest full run that went through: its findings are shown
    drifted: list[Finding]
    missing: list[Finding]

    @property
    def latest_did_not_complete(self) -> bool:
        return self.latest is not None and self.latest.status not in COMPLETED


def _findings(run: JobRun) -> list[Finding]:
    raw: list[dict[str, Any]] = [f for f in (run.findings or []) if isinstance(f, dict)]
    events = dict(WebhookEvent.objects.filter(
        stripe_event_id__in=[f["event"] for f in raw if f.get("event")])
        .values_list("stripe_event_id", "pk"))
    payouts = Payout.objects.select_related("seller").in_bulk(
        [f["payout_id"] for f in raw if f.get("payout_id")])
    findings = []
    for each in raw:
        outcome, detail = _outcome(str(each.get("applied") or ""))
        event_id = str(each.get("event") or "")
        findings.append(Finding(
            payout_id=each["payout_id"], stripe_payout_id=each.get("stripe_payout_id", ""),
            account=each.get("account", ""),
            payout_url=reverse("payout-detail", args=[each["payout_id"]]),
            fields=[FieldDrift(name, str(values[0]), str(values[1]))
                    for name, values in (each.get("fields") or {}).items()],
            missing=bool(each.get("missing")), applied=str(each.get("applied") or ""),
            outcome=outcome, detail=detail, event_id=event_id,
            event_url=(reverse("event-detail", args=[events[event_id]])
                       if event_id in events else ""),
            payout=payouts.get(each["payout_id"])))
    return findings


def reconciliation() -> Reconciliation:
    """What the newest full reconcile run (no scope: not a one-payout resync) found.

    A run that failed or was abandoned went through only part of the payouts (or none):
    its findings are not the picture. The page shows the newest run that completed, and
    says when a newer one did not."""
    full = JobRun.objects.filter(job=Job.RECONCILE_PAYOUTS, scope="").order_by("-started_at",
                                                                                "-id")
    latest = full.filter(status__in=FINISHED).first()
    shown = latest if latest is not None and latest.status in COMPLETED else \
        full.filter(status__in=COMPLETED).first()
    findings = _findings(shown) if shown is not None else []
    return Reconciliation(latest=latest, shown=shown,
                          drifted=[f for f in findings if not f.missing],
                          missing=[f for f in findings if f.missing])


def resync_lines(run: JobRun) -> list[str]:
    """What a drifted Resync from Stripe found and did, one line per payout."""
    lines = []
    for each in _findings(run):
        where = f"on {each.account}" if each.account else "on the platform account"
        if each.missing:
            lines.append(f"{each.stripe_payout_id} is missing at Stripe (404 {where}): "
                         f"kept as it is, and marked for review.")
            continue
        fields = "; ".join(f"{f.name} {f.ours} → {f.stripe}" for f in each.fields)
        if each.outcome == "applied":
            lines.append(f"{each.stripe_payout_id} differed from Stripe (ours → Stripe's: "
                         f"{fields}); applied" + (f" ({each.detail})" if each.detail else "")
                         + ": the payout now has Stripe's state.")
        else:
            lines.append(f"{each.stripe_payout_id} differs from Stripe (ours → Stripe's: "
                         f"{fields}); not applied ({each.applied or 'nothing done'}): "
                         "marked for review.")
    return lines
