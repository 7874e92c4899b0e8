// The try-it page: the coupon's live state from its public feed, a request for a typed user id,
// the answer, then the request's status until it is issued. The public API only, nothing else.
"use strict";

(() => {
  const couponId = location.pathname.split("/").filter(Boolean).pop();
  const jwtMode = document.documentElement.dataset.auth === "jwt";
  const byId = (id) => document.getElementById(id);
  const FEED_EVENTS = ["snapshot", "remaining", "sold_out", "reopened", "paused", "resumed",
    "started", "closed"];
  const STATUS_POLL_MS = 500;
  const STATUS_POLLS = 240; // two minutes, then the page stops asking
  // Problem codes of the issue route and what they mean to the person clicking.
  const REFUSALS = {
    DUPLICATED_COUPON_ISSUE: ["duplicate", "warn", "Already requested",
      "This user has already requested this coupon; its status follows."],
    INVALID_COUPON_ISSUE_QUANTITY: ["sold_out", "bad", "Sold out", "No coupon is left."],
    INVALID_COUPON_ISSUE_DATE: ["outside_window", "warn", "Outside the window",
      "The drop is not open now."],
    COUPON_PAUSED: ["paused", "warn", "Paused", "The drop is paused; try again when it resumes."],
    RATE_LIMITED: ["rate_limited", "warn", "Too many requests", "Wait a moment, then try again."],
  };

  const localTime = (iso) => new Date(iso).toLocaleString(undefined,
    { dateStyle: "medium", timeStyle: "medium" });

  function render(view) {
    byId("title").textContent = `${view.title} (coupon ${view.id})`;
    document.title = `Try: ${view.title}`;
    byId("total").textContent = view.total_quantity === null ? "unlimited" : view.total_quantity;
    byId("remaining").textContent = view.remaining === null ? "unlimited" : view.remaining;
    let phase = ["Open", "ok"];
    if (view.phase === "upcoming") phase = [`Opens ${localTime(view.date_issue_start)}`, "muted"];
    else if (view.phase === "closed") phase = ["Closed", "muted"];
    else if (view.paused) phase = ["Paused", "warn"];
    else if (view.sold_out) phase = ["Sold out", "bad"];
    const badge = byId("phase");
    badge.textContent = phase[0];
    badge.dataset.tone = phase[1];
    badge.dataset.phase = view.sold_out ? "sold_out" : view.phase;
    byId("window").textContent =
      `Window: ${localTime(view.date_issue_start)} to ${localTime(view.date_issue_end)}`;
  }

  let backoff = 1000;

  function follow() {
    const connection = byId("connection");
    const source = new EventSource(`/v1/coupons/${couponId}/events`);
    source.onopen = () => {
      connection.textContent = "Live";
      connection.dataset.live = "true";
      backoff = 1000;
    };
    source.onerror = () => {
      connection.textContent = "Reconnecting to the live feed…";
      connection.dataset.live = "false";
      // EventSource gives up for good after an answer other than 200 (a 429 or a 503
      // FEED_FULL): start again, less often each time.
      if (source.readyState === EventSource.CLOSED) {
        setTimeout(follow, backoff);
        backoff = Math.min(backoff * 2, 30000);
      }
    };
    for (const name of FEED_EVENTS) {
      source.addEventListener(name, (event) => render(JSON.parse(event.data)));
    }
  }

  function showAnswer(outcome, tone, title, detail) {
    const answer = byId("answer");
    answer.replaceChildren();
    const box = document.createElement("p");
    box.className = "answer";
    box.dataset.outcome = outcome;
    box.dataset.tone = tone;
    const strong = document.createElement("strong");
    strong.textContent = title;
    box.append(strong, document.createTextNode(detail));
    answer.append(box);
  }

  function authHeaders() {
    const token = byId("token").value.trim();
    return jwtMode && token ? { Authorization: `Bearer ${token}` } : {};
  }

  // The user a jwt-mode token names (its sub), to ask for the status of a duplicate.
  function tokenUser() {
    try {
      const payload = byId("token").value.trim().split(".")[1];
      const json = atob(payload.replace(/-/g, "+").replace(/_/g, "/"));
      return String(JSON.parse(json).sub);
    } catch {
      return null;
    }
  }

  async function problemOf(response) {
    try {
      return await response.json();
    } catch {
      return { code: `HTTP_${response.status}`, detail: response.statusText };
    }
  }

  let polling = 0; // a new request stops the previous one's status polling

  async function followStatus(userId) {
    const run = ++polling;
    const log = byId("status-log");
    log.replaceChildren();
    let last = null;
    for (let poll = 0; poll < STATUS_POLLS && run === polling; poll += 1) {
      let status;
      try {
        const response = await fetch(`/v1/coupons/${couponId}/issues/${userId}`,
          { headers: authHeaders() });
        status = response.ok ? (await response.json()).status
          : `${response.status} ${(await problemOf(response)).code}`;
      } catch {
        status = "no answer (retrying)";
      }
      if (status !== last) {
        const item = document.createElement("li");
        item.dataset.status = status;
        item.textContent = `${new Date().toLocaleTimeString()}: ${status}`;
        log.append(item);
        log.dataset.status = status;
        last = status;
      }
      if (status === "issued" || status === "failed") return;
      await new Promise((resolve) => setTimeout(resolve, STATUS_POLL_MS));
    }
  }

  async function request(event) {
    event.preventDefault();
    const typed = byId("user-id").value.trim();
    if (!jwtMode && !/^[1-9][0-9]{0,18}$/.test(typed)) {
      showAnswer("invalid", "bad", "Not a user id", "Type a whole number from 1 up.");
      byId("user-id").focus();
      return;
    }
    const button = byId("request");
    button.disabled = true;
    try {
      // The id is written into the JSON as digits, so ids beyond 2^53 keep every digit.
      const body = jwtMode ? "{}" : `{"user_id": ${typed}}`;
      const response = await fetch(`/v1/coupons/${couponId}/issues`, {
        method: "POST",
        headers: { "Content-Type": "application/json", ...authHeaders() },
        body,
      });
      if (response.status === 202) {
        const accepted = await response.json();
        showAnswer("accepted", "ok", "Accepted",
          `The request is queued (request ${accepted.request_id}); the coupon is yours once it is issued.`);
        // In jwt mode the user is the token's sub, read as text: a JSON number above 2^53
        // would lose digits.
        followStatus(jwtMode ? tokenUser() : typed);
        return;
      }
      const problem = await problemOf(response);
      const known = REFUSALS[problem.code];
      if (known) {
        showAnswer(known[0], known[1], known[2], ` ${known[3]}`);
        const user = jwtMode ? tokenUser() : typed;
        if (known[0] === "duplicate" && user) followStatus(user);
      } else {
        showAnswer("error", "bad", `${response.status} ${problem.code || ""}`.trim(),
          ` ${problem.detail || "The gateway refused the request."}`);
      }
    } catch {
      showAnswer("error", "bad", "No answer", " The gateway did not answer; try again.");
    } finally {
      button.disabled = false;
    }
  }

  if (jwtMode) {
    byId("user-field").hidden = true;
    byId("token-field").hidden = false;
  }
  byId("claim").addEventListener("submit", request);
  follow();
})();
