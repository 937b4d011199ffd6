// A step's samples: a step picker, filters, the list, and one sample in detail (conversation, reward, tokens).
// The "Samples" tab has one panel; "Compare two steps" has two, each with its own step.
"use strict";

const TRI = [["any", "any"], ["yes", "yes"], ["no", "no"]];

function triSelect(label, name) {
  return el("label", {}, label + " ",
    el("select", { "data-filter": name }, TRI.map(([v, text]) => el("option", { value: v }, text))));
}

function triMatch(value, wanted) { return wanted === "any" || (wanted === "yes") === Boolean(value); }

class SamplePanel {
  constructor(root, data, start) {
    this.root = root; this.data = data; this.start = start;
    this.run = null; this.step = null; this.samples = []; this.selected = null;
    this.stepSelect = el("select", { "aria-label": "step", onchange: () => this.load(Number(this.stepSelect.value), false) });
    this.follow = el("input", { type: "checkbox", checked: start === "latest" });
    this.stats = el("div", { class: "step-stats" });
    this.minReward = el("input", { type: "number", step: "any", size: 5, "data-filter": "reward-min", placeholder: "min" });
    this.maxReward = el("input", { type: "number", step: "any", size: 5, "data-filter": "reward-max", placeholder: "max" });
    this.withTokens = el("input", { type: "checkbox", "data-filter": "tokens" });
    this.filters = el("div", { class: "toolbar" },
      el("label", {}, "reward from ", this.minReward, " to ", this.maxReward),
      triSelect("correct", "correct"), triSelect("truncated", "truncated"),
      triSelect("tool errors", "tool_errors"), triSelect("failed", "failed"),
      el("label", {}, this.withTokens, " with token view only"));
    this.filters.addEventListener("input", () => this.renderList());
    this.count = el("div", { class: "explain" });
    this.list = el("div", { class: "sample-list" });
    this.detail = el("div", { class: "detail" });
    root.append(
      el("div", { class: "toolbar" },
        el("label", {}, "RL step "),
        el("button", { class: "small", title: "previous step", onclick: () => this.move(-1) }, "◀"),
        this.stepSelect,
        el("button", { class: "small", title: "next step", onclick: () => this.move(1) }, "▶"),
        el("label", {}, this.follow, " follow the newest step")),
      this.stats, this.filters, this.count, this.list, this.detail);
  }

  setRun(run) {
    this.run = run;
    const steps = run.steps.map(s => s.step);
    this.stepSelect.replaceChildren(...steps.map(s => el("option", { value: s }, `${s} of ${run.total_steps || "?"}`)));
    if (!steps.length) {
      this.stats.textContent = "No samples saved yet: the first step's samples appear here when it ends " +
        "(logging.save_trajectories).";
      return;
    }
    let target = this.step;
    if (target === null || !steps.includes(target)) target = this.start === "first" ? steps[0] : steps[steps.length - 1];
    else if (this.follow.checked) target = steps[steps.length - 1];
    const entry = run.steps.find(s => s.step === target);
    if (target !== this.step || entry.version !== this.version) this.load(target, target === this.step);
    else this.stepSelect.value = this.step;
  }

  move(delta) {
    const options = [...this.stepSelect.options].map(o => Number(o.value));
    const at = options.indexOf(this.step) + delta;
    if (at >= 0 && at < options.length) { this.follow.checked = false; this.load(options[at], false); }
  }

  async load(step, keepSelection) {
    const data = await this.data.step(step);
    const entry = this.run.steps.find(s => s.step === step);
    this.step = step; this.version = entry ? entry.version : null;
    this.stepSelect.value = step;
    this.samples = data.samples;
    const row = this.run.metrics.find(r => r.step === step) || {};
    const kept = this.samples.filter(s => s.tokens).length;
    const failed = this.samples.filter(s => s.failed).length;
    this.stats.replaceChildren(
      el("b", {}, `step ${step}: `),
      `reward ${num(row.reward_mean)} · accuracy ${num(row.accuracy)} · mismatch |Δ logp| ` +
      `${row.mismatch_abs_logp === undefined ? "–" : num(row.mismatch_abs_logp)} · ${this.samples.length} samples ` +
      `(${kept} with the token view, ${failed} failed) · policy version after the update ${row.policy_version ?? "–"}`);
    if (!keepSelection || this.selected === null || !this.samples[this.selected]) {
      const first = this.samples.findIndex(s => s.tokens);
      this.selected = first >= 0 ? first : (this.samples.length ? 0 : null);
    }
    this.renderList();
    this.renderDetail();
  }

  visible() {
    const get = name => this.filters.querySelector(`[data-filter="${name}"]`).value;
    const lo = this.minReward.value === "" ? -Infinity : Number(this.minReward.value);
    const hi = this.maxReward.value === "" ? Infinity : Number(this.maxReward.value);
    return this.samples.map((s, i) => [s, i]).filter(([s]) =>
      (s.reward === null ? lo === -Infinity && hi === Infinity : s.reward >= lo && s.reward <= hi) &&
      triMatch(s.correct, get("correct")) && triMatch(s.status === "truncated", get("truncated")) &&
      triMatch(s.num_tool_errors > 0, get("tool_errors")) && triMatch(s.failed, get("failed")) &&
      (!this.withTokens.checked || s.tokens));
  }

  renderList() {
    const rows = this.visible();
    this.count.textContent = `${rows.length} of ${this.samples.length} samples match the filters; click one to ` +
      "see it below. Samples of one prompt share a group; the token view marks the few kept with their tokens.";
    const head = el("tr", {}, ["sample", "group", "reward", "correct", "status", "turns", "tool calls", "tool errors",
      "length", "advantage", "token view"].map(h => el("th", {}, h)));
    const body = rows.map(([s, i]) => el("tr", { class: i === this.selected ? "selected" : "", "data-index": i,
        onclick: () => { this.selected = i; this.renderList(); this.renderDetail(); } },
      el("td", {}, s.sample_id), el("td", { class: "num" }, s.group_id),
      el("td", { class: "num" }, s.reward === null ? "–" : num(s.reward)),
      el("td", { class: s.correct ? "yes" : "no" }, s.correct ? "✓" : "✗"),
      el("td", {}, el("span", { class: "badge " + (s.failed ? "failed" : s.status) }, s.failed ? "failed" : s.status)),
      el("td", { class: "num" }, s.num_turns), el("td", { class: "num" }, s.num_tool_calls),
      el("td", { class: "num" }, s.num_tool_errors), el("td", { class: "num" }, s.response_length),
      el("td", { class: "num" }, signed(s.advantage)), el("td", {}, s.tokens ? "tokens" : "")));
    this.list.replaceChildren(el("table", {}, el("thead", {}, head), el("tbody", {}, body)));
  }

  renderDetail() {
    const s = this.selected === null ? null : this.samples[this.selected];
    if (!s) { this.detail.replaceChildren(); return; }
    const breakdown = Object.entries(s.reward_breakdown || {});
    const parts = [
      el("div", { class: "detail-head" },
        el("h2", {}, `sample ${s.sample_id}`),
        el("span", { class: "badge " + (s.failed ? "failed" : s.status) },
          s.failed ? "failed" : s.status + (s.truncation ? ` (${s.truncation})` : "")),
        el("span", { class: "kv" }, "reward ", el("b", {}, s.reward === null ? "–" : num(s.reward))),
        el("span", { class: "kv" }, "correct ", el("b", { class: s.correct ? "yes" : "no" }, s.correct ? "yes" : "no")),
        el("span", { class: "kv" }, "advantage ", el("b", {}, signed(s.advantage))),
        el("span", { class: "kv" }, "expected answer ", el("b", {}, String(s.ground_truth))),
        el("span", { class: "kv" }, "prompt group ", el("b", {}, s.group_id)),
        el("span", { class: "kv", title: "the policy versions (weight pushes) whose weights generated its tokens" },
          "generated by policy version ", el("b", {}, (s.policy_versions || []).join(", ") || "–"))),
    ];
    if (s.failed) parts.push(el("p", { class: "no" }, "Left out of training: " + (s.failure || s.error || "")));
    if (breakdown.length) {
      parts.push(el("div", { class: "kv" }, "reward = ", breakdown.map(([k, v], j) =>
        el("span", {}, j ? " + " : "", el("b", {}, num(v)), ` (${k})`)),
        el("span", { class: "muted" }, " · each reward function's score, weighted as configured")));
    }
    parts.push(el("h3", {}, "Conversation"), ...renderConversation(s.messages));
    if (s.tokens) parts.push(renderTokens(s));
    else parts.push(el("p", { class: "explain" }, "No token view for this sample: each step keeps its tokens for a " +
      "few samples only (logging.samples_per_step, the best and the worst of a few prompts); tick 'with token view " +
      "only' to list them."));
    this.detail.replaceChildren(...parts);
  }
}
