// The page: tabs, where the data comes from (embedded in an exported file, or the server's JSON API, polled so a
// run that is still going shows its new steps), and the status line.
"use strict";

const EMBED = window.TIDERL_EMBED;
const POLL_MS = 3000;

const source = {
  cache: new Map(),
  async run() {
    if (EMBED) return EMBED.run;
    const response = await fetch("api/run", { cache: "no-store" });
    return response.json();
  },
  async step(step) {
    if (EMBED) return EMBED.steps[String(step)] || { step, samples: [] };
    const entry = (app.run.steps.find(s => s.step === step) || {}).version;
    const key = `${step}@${entry}`;
    if (!this.cache.has(key)) {
      const response = await fetch(`api/step/${step}`, { cache: "no-store" });
      this.cache.set(key, await response.json());
    }
    return this.cache.get(key);
  },
};

const app = {
  run: null, panels: [], lastChange: Date.now(), signature: "",

  start() {
    document.querySelectorAll("#tabs button").forEach(button => button.addEventListener("click", () => {
      document.querySelectorAll("#tabs button").forEach(b => b.classList.toggle("active", b === button));
      document.querySelectorAll(".tab").forEach(t => t.classList.toggle("active", t.id === "tab-" + button.dataset.tab));
      window.dispatchEvent(new Event("resize"));  // plotly sizes charts that were hidden
    }));
    this.panels = [new SamplePanel(document.getElementById("panel-main"), source, "latest"),
                   new SamplePanel(document.getElementById("panel-left"), source, "first"),
                   new SamplePanel(document.getElementById("panel-right"), source, "latest")];
    this.refresh();
    if (!EMBED) setInterval(() => this.refresh(), POLL_MS);
    setInterval(() => this.showStatus(), 1000);
  },

  async refresh() {
    let run;
    try { run = await source.run(); } catch (e) { this.showStatus("the server does not answer (stopped?)"); return; }
    const signature = `${run.metrics.length}/${run.steps.map(s => s.version).join(",")}/${Object.keys(run.eval || {})}`;
    if (signature === this.signature) return;
    this.signature = signature; this.run = run; this.lastChange = Date.now();
    document.getElementById("run-name").textContent = run.name;
    document.title = `tiderl run ${run.name}`;
    document.getElementById("config").textContent = run.config_text;
    drawEvalSummary(document.getElementById("eval-summary"), run);
    drawCharts(document.getElementById("charts"), run);
    this.panels.forEach(panel => panel.setRun(run));
    this.showStatus();
  },

  showStatus(problem) {
    const status = document.getElementById("status");
    if (!this.run) { status.textContent = problem || "loading…"; return; }
    const last = this.run.metrics.length ? this.run.metrics[this.run.metrics.length - 1].step : 0;
    const steps = `step ${last} of ${this.run.total_steps || "?"}`;
    if (EMBED) {
      status.textContent = `snapshot of ${this.run.path} · ${steps}`;
    } else if (problem) {
      status.textContent = `${steps} · ${problem}`;
    } else if (this.run.finished) {
      status.textContent = `finished · ${steps}`;
    } else {
      status.textContent = `● live: ${steps} · new data ${ago((Date.now() - this.lastChange) / 1000)} · ` +
        "the page follows the run as it goes";
    }
    status.classList.toggle("live", !EMBED && !this.run.finished && !problem);
  },
};

app.start();
