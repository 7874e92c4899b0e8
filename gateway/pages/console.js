// The operator console: one `state` event a second from /admin/console/events, each the whole
// state of the drop, drawn into the page without a reload. No framework: a card per coupon,
// updated in place, and two small SVG charts per card.
"use strict";

(() => {
  const byId = (id) => document.getElementById(id);
  const number = new Intl.NumberFormat();
  const fmt = (value) => (value === null || value === undefined ? "–" : number.format(value));
  const clock = (iso) => new Date(iso).toLocaleTimeString(undefined,
    { hour: "2-digit", minute: "2-digit", second: "2-digit", fractionalSecondDigits: 3 });
  const moment = (iso) => new Date(iso).toLocaleString(undefined,
    { dateStyle: "medium", timeStyle: "medium" });
  const ANSWER_NAMES = {
    accepted: "accepted", sold_out: "sold out", duplicate: "duplicate",
    outside_window: "outside the window", paused: "paused", shed: "shed (503)",
    unconfirmed: "unconfirmed (503)", unavailable: "unavailable (503)", rate_limited: "rate limited",
  };
  const COUNTERS = [
    ["total", "Total"], ["reserved", "Reserved"], ["remaining", "Remaining"],
    ["issued", "Issued"], ["pending", "Pending"], ["dead_lettered", "Dead-lettered"],
  ];
  const SVG = "http://www.w3.org/2000/svg";
  const cards = new Map();
  let shownWarnings = "";

  function element(tag, attributes = {}, text = "") {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
    if (text) node.textContent = text;
    return node;
  }

  function chart(title, firstName, secondName) {
    const figure = element("figure");
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "chart");
    svg.setAttribute("viewBox", "0 0 300 100");
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    const first = document.createElementNS(SVG, "polyline");
    first.setAttribute("class", "first");
    const second = document.createElementNS(SVG, "polyline");
    second.setAttribute("class", "second");
    svg.append(first, second);
    const caption = element("figcaption");
    const heading = element("strong", {}, title);
    const legend = element("span");
    legend.append(" ", element("span", { class: "legend-first" }, `— ${firstName}`), " ",
      element("span", { class: "legend-second" }, `- - ${secondName}`));
    const reading = element("span", { class: "reading" });
    caption.append(heading, legend, element("br"), reading);
    figure.append(svg, caption);
    return { figure, svg, first, second, reading };
  }

  // Draw two series over the same time axis; the scale is the larger series' peak.
  function draw(plot, history, firstIndex, secondIndex, unit) {
    if (history.length === 0) {
      plot.reading.textContent = "No sample yet.";
      plot.svg.setAttribute("aria-label", "No sample yet.");
      return;
    }
    const values = (index) => history.map((point) => point[index]);
    const firsts = values(firstIndex);
    const seconds = values(secondIndex);
    const known = [...firsts, ...seconds].filter((v) => v !== null);
    const peak = Math.max(0, ...known);
    const scale = Math.max(peak, 1); // an idle coupon's zero line sits at the bottom
    const start = history[0][0];
    const span = Math.max(history[history.length - 1][0] - start, 1);
    const points = (series) => series.map((v, i) => (v === null ? null
      : `${((history[i][0] - start) / span * 300).toFixed(1)},${(98 - v / scale * 94).toFixed(1)}`))
      .filter((p) => p !== null).join(" ");
    plot.first.setAttribute("points", points(firsts));
    plot.second.setAttribute("points", points(seconds));
    const latest = (series) => {
      for (let i = series.length - 1; i >= 0; i -= 1) if (series[i] !== null) return series[i];
      return null;
    };
    const seconds_ = Math.round(span / 1000);
    const text = known.length === 0 ? `Nothing in the last ${seconds_} s.`
      : `Now ${fmt(latest(firsts))} and ${fmt(latest(seconds))} ${unit};`
        + ` peak ${fmt(peak)} ${unit}, over the last ${seconds_} s.`;
    plot.reading.textContent = text;
    plot.svg.setAttribute("aria-label", text);
  }

  function card(coupon) {
    const article = element("article", { class: "panel coupon", "data-coupon-id": coupon.id });
    const heading = element("h2");
    const badge = element("span", { class: "badge" });
    const name = element("span");
    heading.append(name, " ", badge);
    const counters = element("dl", { class: "counters" });
    const values = {};
    for (const [key, label] of COUNTERS) {
      const cell = element("div");
      values[key] = element("dd", { "data-counter": key });
      cell.append(element("dt", {}, label), values[key]);
      counters.append(cell);
    }
    const window_ = element("p", { class: "meta" });
    const soldOut = element("p", { class: "meta sold-out-at" });
    const backlog = element("p", { class: "meta" });
    const rates = chart("Requests a second", "accepted", "issued");
    const timing = chart("Acceptance to MySQL row (ms)", "mean", "max");
    const charts = element("div", { class: "charts" });
    charts.append(rates.figure, timing.figure);
    article.append(heading, counters, window_, soldOut, backlog, charts);
    return { article, name, badge, values, window_, soldOut, backlog, rates, timing };
  }

  function update(view, coupon) {
    view.name.textContent = `${coupon.title} (coupon ${coupon.id})`;
    let state = ["open", "Open", "ok"];
    if (coupon.paused) state = ["paused", "Paused", "warn"];
    if (coupon.phase === "upcoming") state = ["upcoming", "Upcoming", "muted"];
    if (coupon.phase === "closed") state = ["closed", "Closed", "muted"];
    if (coupon.sold_out_at) state = ["sold_out", "Sold out", "bad"];
    view.badge.textContent = state[1];
    view.badge.dataset.tone = state[2];
    view.article.dataset.state = state[0];
    for (const [key] of COUNTERS) {
      const value = key === "total" && coupon.total === null ? "unlimited" : fmt(coupon[key]);
      view.values[key].textContent = value;
    }
    view.window_.textContent = `Window ${moment(coupon.date_issue_start)} to `
      + `${moment(coupon.date_issue_end)}; ${fmt(coupon.requested)} requests accepted in all.`;
    if (coupon.sold_out_at) {
      const after = (Date.parse(coupon.sold_out_at) - Date.parse(coupon.date_issue_start)) / 1000;
      view.soldOut.textContent = `Sold out at ${clock(coupon.sold_out_at)}`
        + (after >= 0 ? `, ${after.toFixed(1)} s after the window opened.` : ".");
    } else {
      view.soldOut.textContent = "Not sold out.";
    }
    const b = coupon.backlog;
    view.backlog.textContent = coupon.pending === 0 ? "Workers are up to date."
      : `Waiting for a worker: ${fmt(b.unread)} unread, ${fmt(b.unacknowledged)} being`
        + ` written; the oldest accepted ${b.oldest_age_seconds.toFixed(1)} s ago.`;
    draw(view.rates, coupon.history, 1, 2, "a second");
    draw(view.timing, coupon.history, 3, 4, "ms");
  }

  // The list shows every warning with its current numbers; a screen reader hears only a change
  // of which warnings stand (the live region below), not the numbers each second.
  function showWarnings(warnings) {
    const list = byId("warnings");
    list.replaceChildren(...warnings.map((w) => element("li", { "data-code": w.code }, w.detail)));
    byId("all-clear").hidden = warnings.length > 0;
    const key = JSON.stringify(warnings.map((w) => [w.code, w.coupon_id]));
    if (key !== shownWarnings) {
      shownWarnings = key;
      byId("warnings-said").textContent = warnings.length === 0 ? "No warnings."
        : `${warnings.length} warning${warnings.length > 1 ? "s" : ""}: `
          + warnings.map((w) => w.code.replace(/_/g, " ")).join(", ");
    }
  }

  function render(state) {
    showWarnings(state.warnings);
    byId("summary").textContent = state.at === null ? "Redis does not answer."
      : `Updated ${clock(state.at)} (Redis clock) · workers alive: ${fmt(state.workers)}`;
    const answers = Object.entries(state.answers || {}).filter(([, rate]) => rate > 0);
    byId("answers").textContent = answers.length === 0 ? ""
      : "This host answers a second: "
        + answers.map(([outcome, rate]) => `${ANSWER_NAMES[outcome] || outcome} ${fmt(rate)}`).join(", ");
    const container = byId("coupons");
    const live = new Set();
    for (const coupon of state.coupons) {
      live.add(coupon.id);
      let view = cards.get(coupon.id);
      if (!view) {
        view = card(coupon);
        cards.set(coupon.id, view);
      }
      update(view, coupon);
      container.append(view.article); // keeps the server's order (newest first)
    }
    for (const [id, view] of cards) {
      if (!live.has(id)) {
        view.article.remove();
        cards.delete(id);
      }
    }
    byId("empty").hidden = state.coupons.length > 0 || state.at === null;
    byId("more").hidden = !state.more;
    byId("more").textContent = `${fmt(state.more)} older live coupons are not shown.`;
  }

  const connection = byId("connection");
  let backoff = 1000;

  function connect() {
    const source = new EventSource("/admin/console/events");
    source.onopen = () => {
      connection.textContent = "Live";
      connection.dataset.live = "true";
      backoff = 1000;
    };
    source.onerror = () => {
      connection.textContent = "Reconnecting…";
      connection.dataset.live = "false";
      // A session that ended (expired, or its token rotated) sends the browser to sign in.
      fetch("/admin/console", { headers: { Accept: "application/json" } }).then((response) => {
        if (response.status === 401) location.reload();
      }).catch(() => {});
      // EventSource gives up for good after an answer other than 200 (a 503 while the gateway
      // stops): start again, less often each time.
      if (source.readyState === EventSource.CLOSED) {
        setTimeout(connect, backoff);
        backoff = Math.min(backoff * 2, 30000);
      }
    };
    source.addEventListener("state", (event) => render(JSON.parse(event.data)));
  }

  connect();
})();
