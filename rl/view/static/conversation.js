// A sample's conversation: roles set apart, think spans collapsible, tool calls and tool results boxed.
"use strict";

const SPANS = /(<think>[\s\S]*?(?:<\/think>|$)|<tool_call>[\s\S]*?(?:<\/tool_call>|$))/g;

function assistantContent(text) {
  const out = [];
  for (const part of String(text).split(SPANS)) {
    if (!part) continue;
    if (part.startsWith("<think>")) {
      const inner = part.replace(/^<think>/, "").replace(/<\/think>$/, "");
      out.push(el("details", { class: "think" },
        el("summary", {}, `thinking (${inner.length} characters): click to show`), el("div", { class: "text" }, inner)));
    } else if (part.startsWith("<tool_call>")) {
      const inner = part.replace(/^<tool_call>/, "").replace(/<\/tool_call>$/, "");
      let shown = inner;
      try { shown = JSON.stringify(JSON.parse(inner), null, 1); } catch (e) { /* shown as written: it did not parse */ }
      out.push(el("div", { class: "toolcall" }, el("span", { class: "label" }, "tool call"), el("pre", {}, shown)));
    } else {
      out.push(el("span", { class: "text" }, part));
    }
  }
  return out;
}

function renderConversation(messages) {
  const out = [];
  for (const m of messages || []) {
    const role = m.role || "?";
    const content = typeof m.content === "string" ? m.content : JSON.stringify(m.content);
    if (role === "system") {
      out.push(el("details", { class: "msg system" }, el("summary", { class: "role" }, "system prompt (click to show)"),
        el("pre", {}, content)));
    } else if (role === "tool") {
      out.push(el("div", { class: "msg tool" }, el("div", { class: "tool-label" }, "tool result (the environment's answer)"),
        el("pre", {}, content)));
    } else if (role === "assistant") {
      out.push(el("div", { class: "msg assistant" }, el("div", { class: "role" }, "policy (assistant)"),
        ...assistantContent(content)));
    } else {
      out.push(el("div", { class: "msg " + role }, el("div", { class: "role" }, role), el("div", { class: "text" }, content)));
    }
  }
  return out;
}
