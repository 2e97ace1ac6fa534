"""`curate caption`: parses the captioning options, runs the release, prints the summary."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from captions.options import CaptionOptions, RetryPolicy, default_provider
from curation.store.layout import Workdir
from med3dinsight.common import WorkdirOpt, console, out
from med3dinsight.common import progress_bar as _progress


def _diversity(release: Path) -> str | None:
    """The release's caption-diversity line (distinct texts, most common share), or None."""
    import pyarrow.parquet as pq

    from captions.offline import caption_diversity, diversity_line

    try:
        rows = pq.read_table(release, columns=["caption", "refused"]).to_pydict()
    except (OSError, ValueError, KeyError):
        return None
    return diversity_line(caption_diversity(c for c, r in zip(rows["caption"], rows["refused"]) if not r))


def _fail_line(message: str, code: int) -> typer.Exit:
    """Like ``fail``, but never wrapped: one fault, one line, whatever the terminal width."""
    console.print("[red]error:[/red] " + escape(message), soft_wrap=True)
    return typer.Exit(code)


def _progress_note(s, answered: int) -> str:
    """The captioning bar's note from the live summary ``s``. ``answered``: answers stored so far
    (the bar's count); a provider that adds its successes up only at the end (the offline
    captioner) still shows them as they are written."""
    ok = max(s.succeeded, answered - s.refused - s.truncated)
    usd = "n/a" if s.usd_actual is None else f"${s.usd_actual:.4f}"
    return (f"cached {s.cached} · ok {ok} · refused {s.refused} · failed {s.failed} · "
            f"tokens {s.prompt_tokens}/{s.completion_tokens} · {usd}")


def caption_cmd(
    workdir: Path = WorkdirOpt,
    provider: Optional[str] = typer.Option(None, "--provider", help="openai | offline (default: openai when OPENAI_API_KEY or --base-url is set, else offline)."),
    model: Optional[str] = typer.Option(None, "--model", help="Vision model the provider serves (default gpt-4o; GPT-4V names accepted; the offline provider's is its template)."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="URL of any OpenAI-compatible server (vLLM, Ollama, Azure...), e.g. http://localhost:8000/v1; default: api.openai.com."),
    budget: Optional[int] = typer.Option(None, "--budget", help="The release holds the first N slices of the selection order; cached answers count and cost nothing, so a rerun converges and then sends nothing."),
    max_usd: Optional[float] = typer.Option(None, "--max-usd", help="Stop before this run's estimated spend exceeds this many US dollars (cached answers cost nothing); default: no cap."),
    concurrency: int = typer.Option(CaptionOptions.concurrency, "--concurrency", help="Requests in flight at once (sync mode); --rpm and --tpm still cap the rate."),
    rpm: Optional[float] = typer.Option(None, "--rpm", help="Client-side cap on requests per minute (default: none; the server's 429s are honoured either way)."),
    tpm: Optional[float] = typer.Option(None, "--tpm", help="Client-side cap on tokens per minute, estimated before sending (default: none)."),
    mode: str = typer.Option(CaptionOptions.mode, "--mode", help="sync | batch (Batch API, 50% cheaper, up to 24 h)."),
    detail: str = typer.Option(CaptionOptions.detail, "--detail", help="low | high | auto: the image detail asked of the model (high costs more image tokens)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Resize images client-side to this longest side in pixels before sending (default: the PNG as rendered; open-model servers ignore --detail)."),
    reasoning_effort: Optional[str] = typer.Option(None, "--reasoning-effort", help="none|minimal|low|medium|high|xhigh for reasoning models (default low for gpt-5*/o*)."),
    max_tokens: int = typer.Option(CaptionOptions.max_tokens, "--max-tokens", help="Completion tokens for the caption (reasoning models get an allowance for reasoning on top)."),
    prices_file: Optional[Path] = typer.Option(None, "--prices", help='JSON {"model": {"input": USD/1M, "output": USD/1M, "image_tokens": N}} for models the built-in table lacks.'),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Your prompt template (system, a line ---, user text with {modality} {plane} {level} {body_region} {structures}); its hash is the prompt version."),
    context: str = typer.Option(CaptionOptions.context, "--context", help="What ground truth the prompt carries: labels (default) | metadata (no label structures) | none (image only)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what a run would send (counts, tokens, USD); no request is sent, nothing is written."),
    status: bool = typer.Option(False, "--status", help="List this workdir's pending Batch API batches and exit."),
    retry_refused: bool = typer.Option(False, "--retry-refused", help="Re-ask slices the model refused (or answered empty) with the fallback prompt; the new answers are paid."),
    all_slices: bool = typer.Option(False, "--all", help="Every slice in slice order instead of the ranked order."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Release manifest to write (default manifests/v1.parquet; never overwritten)."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Batch mode: submit/advance and return instead of polling."),
    batch_token_limit: Optional[int] = typer.Option(None, "--batch-token-limit", help="Batch mode: your organisation's enqueued-token limit for the model; batches are cut and submitted so that unfinished ones stay within it (estimated input tokens)."),
    timeout: float = typer.Option(CaptionOptions.timeout, "--timeout", help="Seconds one request may take as a whole (a server that drips its answer times out too); then it is retried."),
    max_retry_wait: float = typer.Option(RetryPolicy.max_hint_s, "--max-retry-wait", help="Longest wait (s) a server may ask for (Retry-After); a request asked to wait longer fails for this run and is asked again by the next."),
    wait: bool = typer.Option(False, "--wait", help="If another caption run holds this workdir, wait for it instead of stopping."),
) -> None:
    """Caption ranked slices with a vision-language model: cached, budgeted, resumable.

    The key comes from OPENAI_API_KEY only. Every answer is committed to cache/captions.sqlite
    as it arrives, so a rerun (or a run after kill -9) never pays twice for an answer that
    arrived. One paying run per workdir at a time. Writes the release manifest with a
    subject-wise 7:1:2 split once the run is complete: while requests wait in batches (--no-wait)
    or failed for this run, it says so and the same command rerun finishes the job.
    """
    import os

    from captions.batch import status as batch_status
    from captions.cost import load_prices
    from captions.errors import CacheError, FatalAPIError, RunLocked
    from captions.prompts import CONTEXTS, load_prompt_file
    from captions.release import run_release

    api_key = os.environ.get("OPENAI_API_KEY") or None
    if status:
        rows = batch_status(Workdir(workdir).batches, api_key=api_key, base_url=base_url)
        if not rows:
            out.print("no pending batches")
        for r in rows:
            out.print(r)
        return
    try:
        if context not in CONTEXTS:
            raise ValueError(f"--context must be none, metadata or labels, not {context!r}")
        options = CaptionOptions(
            provider=provider or default_provider(api_key, base_url), model=model, base_url=base_url,
            api_key=api_key, budget=budget, max_usd=max_usd, concurrency=concurrency, rpm=rpm, tpm=tpm,
            mode=mode, detail=detail, dry_run=dry_run, retry_refused=retry_refused, all_slices=all_slices,
            out=out_path, timeout=timeout, batch_wait=not no_wait, batch_token_limit=batch_token_limit, image_size=image_size,
            reasoning_effort=reasoning_effort, max_tokens=max_tokens, context=context, wait=wait,
            retry=RetryPolicy(max_hint_s=max_retry_wait),
            prices=load_prices(prices_file) if prices_file else None,
            prompt=load_prompt_file(prompt_file, context) if prompt_file else None,
        )
    except ValueError as exc:
        raise _fail_line(str(exc), 2) from None
    with _progress() as progress:
        tasks: dict[str, int] = {}
        answered = {"captioning": 0}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total, note="")
            answered[stage] = done
            progress.update(tasks[stage], completed=done, total=total)

        def on_update(s) -> None:
            if "captioning" in tasks:
                progress.update(tasks["captioning"], note=_progress_note(s, answered["captioning"]))

        try:
            result = run_release(workdir, options, progress=on_progress, on_update=on_update,
                                 on_wait=lambda line: console.print(line, soft_wrap=True))
            if "captioning" in tasks:  # the bar's last line: the run's final counts
                progress.update(tasks["captioning"], note=_progress_note(result.summary, answered["captioning"]))
        except (FileNotFoundError, FileExistsError, ValueError) as exc:
            raise _fail_line(str(exc), 2) from None
        except (RunLocked, CacheError) as exc:
            raise _fail_line(str(exc), 1) from None
        except FatalAPIError as exc:
            console.print(f"[red]stopped:[/red] {exc}", soft_wrap=True)
            raise typer.Exit(1)
    if result.unchanged:
        out.print(f"{result.out} already holds this release ({result.rows} rows); nothing was sent",
                  soft_wrap=True)
        return
    s = result.summary
    table = Table(title="curate caption" + (" (dry run)" if dry_run else ""), show_header=False)
    table.add_row("provider / model / mode", f"{s.provider} / {s.model} / {s.mode}"
                  + (f" / reasoning {options.reasoning_effort}" if options.reasoning_effort else ""))
    table.add_row("slices considered", str(s.total))
    table.add_row("cached (free)", str(s.cached))
    table.add_row("to send / over budget", f"{s.to_send} / {s.over_budget}")
    if not dry_run:
        table.add_row("sent / ok / refused / failed", f"{s.sent} / {s.succeeded} / {s.refused} / {s.failed}")
        if s.invalid:
            table.add_row("invalid (far over --max-tokens)", f"{s.invalid} (flagged like refused, not used)")
        if s.broken:
            table.add_row("unusable 200 answers", f"{s.broken} (their tokens are counted below)")
        if s.truncated:
            table.add_row("empty at the completion cap", str(s.truncated))
        usage = f" ({s.usage_estimated} estimated: no usage from the server)" if s.usage_estimated else ""
        table.add_row("tokens in / out (reported)", f"{s.prompt_tokens} / {s.completion_tokens}{usage}")
        table.add_row("USD (reported usage)", "n/a" if s.usd_actual is None else f"{s.usd_actual:.4f}")
    table.add_row("tokens in / out (estimated)", f"{s.est_prompt_tokens} / {s.est_completion_tokens}")
    table.add_row("USD (estimated)", "n/a (unpriced model)" if s.usd_estimated is None else f"{s.usd_estimated:.4f}")
    if s.pending:
        table.add_row("pending in batches", str(s.pending))
    if result.out:
        table.add_row("release manifest", f"{result.out} ({result.rows} rows, {result.refused} refused)")
        table.add_row("splits", ", ".join(f"{k} {v}" for k, v in sorted(result.splits.items())))
        diversity = _diversity(result.out)
        if diversity:
            table.add_row("caption diversity", diversity)
    out.print(table)
    if result.refused and not retry_refused and not s.truncated:
        console.print(f"{result.refused} refused or empty answers are flagged, not used; "
                      "rerun with --retry-refused to re-ask them with the fallback prompt")
    for err in s.errors[:10]:
        console.print(f"error: {err}", soft_wrap=True)
    if s.stopped:
        console.print(f"[yellow]stopped early:[/yellow] {s.stopped}", soft_wrap=True)
    if result.held:
        console.print(f"[yellow]release:[/yellow] {escape(result.held)}", soft_wrap=True)
        if s.failed > s.rejected:  # pending batches are the plan (--no-wait); failures are not success
            raise typer.Exit(1)
