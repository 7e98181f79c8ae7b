/* The steering console (docs/console.md): one prompt, up to four columns (unsteered, or a profile
 * and an optional expert budget each) streamed side by side through the public API, the routing
 * each request got as layers x experts heatmaps, its difference from the unsteered column, the
 * profiles' own tables, and the server's expert usage from /metrics.
 *
 * Every call is the public API's, with the key the user typed (kept in this tab's sessionStorage,
 * sent only in the Authorization header): the page can do nothing the API would refuse that key.
 * No framework, no build step, no inline script or style (the page's CSP forbids them). */
(() => {
  'use strict';

  const KEY_STORAGE = 'unipool-console-key';
  const MAX_COLUMNS = 4;

  const $ = (selector, root = document) => root.querySelector(selector);

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  const state = {
    models: [],
    profiles: [],          // listing entries visible to this key
    bound: null,           // the profile this key is bound to (null: none)
    shape: null,           // {num_layers, num_experts, top_k} of the served model
    columns: [],
    controller: null,      // AbortController of the running requests
    profileRows: new Map(), // name -> Promise of the profile's tables (?rows=true)
    nextColumn: 1,
    refreshes: 0,
    runs: 0,
  };

  // ---- the API ------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, error, where) {
      const body = error && typeof error === 'object' ? error : { message: String(error) };
      super(body.message || `HTTP ${status}`);
      this.name = 'ApiError';
      this.status = status;
      this.type = body.type || null;
      this.code = body.code === undefined ? null : body.code;
      this.param = body.param || null;
      this.where = where || null;
    }
  }

  /** The server's error envelope as one readable line. */
  function describeError(err) {
    if (err instanceof ApiError) {
      const head = [`HTTP ${err.status}`];
      if (err.type) head.push(err.type);
      if (err.code !== null && String(err.code) !== String(err.status)) head.push(String(err.code));
      let text = `${head.join(' · ')}: ${err.message}`;
      if (err.param) text += ` (field: ${err.param})`;
      if (err.where) text += ` [${err.where}]`;
      return text;
    }
    if (err && err.name === 'AbortError') return 'stopped';
    return `error: ${err && err.message ? err.message : String(err)}`;
  }

  function apiKey() {
    return sessionStorage.getItem(KEY_STORAGE) || '';
  }

  function authHeaders(extra) {
    const headers = Object.assign({}, extra || {});
    const key = apiKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    return headers;
  }

  async function errorOf(resp) {
    const text = await resp.text();
    let body = null;
    try { body = JSON.parse(text); } catch (_) { body = null; }
    if (body && typeof body.error === 'object' && body.error !== null) return new ApiError(resp.status, body.error);
    if (body && typeof body.detail === 'string') return new ApiError(resp.status, { message: body.detail });
    return new ApiError(resp.status, { message: text.trim().slice(0, 500) || resp.statusText || `HTTP ${resp.status}` });
  }

  async function api(path, options) {
    const opts = options || {};
    const resp = await fetch(path, {
      method: opts.method || 'GET',
      headers: authHeaders(opts.headers),
      body: opts.body,
      cache: 'no-store',
      credentials: 'omit',
      signal: opts.signal,
    });
    if (!resp.ok) throw await errorOf(resp);
    return resp;
  }

  async function apiJSON(path, options) {
    return (await api(path, options)).json();
  }

  /** POST `body` with `stream: true`; calls onChunk(parsed chunk) for every SSE event until [DONE]. */
  async function streamSSE(path, body, signal, onChunk) {
    const resp = await api(path, {
      method: 'POST', body: JSON.stringify(body), signal, headers: { 'Content-Type': 'application/json' },
    });
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    const handle = (event) => {
      for (const line of event.split('\n')) {
        if (!line.startsWith('data:')) continue;
        const data = line.slice(5).trim();
        if (!data || data === '[DONE]') continue;
        const chunk = JSON.parse(data);
        if (chunk && typeof chunk.error === 'object' && chunk.error !== null) {
          const status = typeof chunk.error.code === 'number' ? chunk.error.code : resp.status;
          throw new ApiError(status, chunk.error, 'in the stream');
        }
        onChunk(chunk);
      }
    };
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, '\n');
      let cut;
      while ((cut = buffer.indexOf('\n\n')) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        handle(event);
      }
    }
    if (buffer.trim()) handle(buffer);
  }

  // ---- .npy (numpy's np.save) in base64 --------------------------------------------------------

  function halfToFloat(h) {
    const sign = h & 0x8000 ? -1 : 1;
    const exponent = (h >> 10) & 0x1f;
    const fraction = h & 0x3ff;
    if (exponent === 0) return sign * Math.pow(2, -14) * (fraction / 1024);
    if (exponent === 31) return fraction ? NaN : sign * Infinity;
    return sign * Math.pow(2, exponent - 15) * (1 + fraction / 1024);
  }

  /** {dtype, shape, data} of a base64 .npy array (uint8/uint16/int/float16/float32, C order). */
  function decodeNpy(base64) {
    const binary = atob(base64);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    const magic = String.fromCharCode(...bytes.subarray(1, 6));
    if (bytes[0] !== 0x93 || magic !== 'NUMPY') throw new Error('not a .npy array');
    const view = new DataView(bytes.buffer);
    const major = bytes[6];
    const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
    const headerStart = major === 1 ? 10 : 12;
    const header = String.fromCharCode(...bytes.subarray(headerStart, headerStart + headerLength));
    const descr = (/'descr':\s*'([^']+)'/.exec(header) || [])[1];
    const shapeText = (/'shape':\s*\(([^)]*)\)/.exec(header) || [])[1];
    if (!descr || shapeText === undefined) throw new Error('unreadable .npy header');
    if (/'fortran_order':\s*True/.test(header)) throw new Error('Fortran-ordered .npy arrays are not read here');
    const shape = shapeText.split(',').map((s) => s.trim()).filter(Boolean).map(Number);
    const count = shape.reduce((a, b) => a * b, 1);
    const offset = headerStart + headerLength;
    const little = descr[0] !== '>';
    const kind = descr.slice(1);
    const readers = {
      u1: [1, (o) => view.getUint8(o), Uint16Array],
      i1: [1, (o) => view.getInt8(o), Int16Array],
      u2: [2, (o) => view.getUint16(o, little), Uint16Array],
      i2: [2, (o) => view.getInt16(o, little), Int16Array],
      u4: [4, (o) => view.getUint32(o, little), Uint32Array],
      i4: [4, (o) => view.getInt32(o, little), Int32Array],
      i8: [8, (o) => Number(view.getBigInt64(o, little)), Float64Array],
      f2: [2, (o) => halfToFloat(view.getUint16(o, little)), Float32Array],
      f4: [4, (o) => view.getFloat32(o, little), Float32Array],
    };
    const reader = readers[kind];
    if (!reader) throw new Error(`unsupported .npy dtype ${descr}`);
    const [size, read, Out] = reader;
    if (offset + count * size > bytes.length) throw new Error('truncated .npy array');
    const data = new Out(count);
    for (let i = 0; i < count; i++) data[i] = read(offset + i * size);
    return { dtype: descr, shape, data };
  }

  // ---- heatmaps (canvas) ---------------------------------------------------------------------

  const RAMPS = {
    seq: [[247, 251, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]],
    neg: [[247, 247, 247], [146, 197, 222], [33, 102, 172]],
    pos: [[247, 247, 247], [244, 165, 130], [178, 24, 43]],
  };

  function ramp(stops, t) {
    const x = Math.min(1, Math.max(0, t)) * (stops.length - 1);
    const i = Math.min(stops.length - 2, Math.floor(x));
    const f = x - i;
    const c = stops[i].map((v, k) => Math.round(v + (stops[i + 1][k] - v) * f));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  }

  function colour(scale, value) {
    if (scale.type === 'mask') return value > 0 ? '#2e7d32' : value < 0 ? '#3c4450' : '#f1f3f5';
    if (!Number.isFinite(value)) return '#000';
    if (scale.type === 'div') {
      if (!scale.max) return ramp(RAMPS.pos, 0);
      return value < 0 ? ramp(RAMPS.neg, -value / scale.max) : ramp(RAMPS.pos, value / scale.max);
    }
    return ramp(RAMPS.seq, scale.max ? value / scale.max : 0);
  }

  function fmt(value, digits) {
    if (!Number.isFinite(value)) return String(value);
    const d = digits === undefined ? 3 : digits;
    return Math.abs(value) >= 1000 ? value.toFixed(0) : value.toFixed(d);
  }

  function legendText(spec) {
    const { scale, unit } = spec;
    if (scale.type === 'mask') return 'green: always chosen (include) · dark grey: never chosen (exclude) · light grey: neither';
    if (scale.type === 'div') {
      return `blue: −${fmt(scale.max)} · white: 0 · red: +${fmt(scale.max)}${unit ? ` (${unit})` : ''}`;
    }
    return `white: 0 · dark blue: ${fmt(scale.max)}${unit ? ` (${unit})` : ''}`;
  }

  /** A figure with a rows x cols heatmap, appended to `container`. spec: title, kind, rows, cols,
   * data (row-major), rowName, rowLabels, scale {type: seq|div|mask, max}, unit, hover(r, c, v). */
  function heatmap(container, spec) {
    const figure = el('figure', 'heatmap');
    figure.dataset.kind = spec.kind;
    figure.append(el('figcaption', null, spec.title));
    const canvas = el('canvas');
    const legend = el('div', 'legend', legendText(spec));
    const hover = el('div', 'hover');
    figure.append(canvas, legend, hover);
    container.append(figure);

    const { rows, cols, data } = spec;
    const rowLabels = spec.rowLabels || Array.from({ length: rows }, (_, i) => i);
    const labelWidth = 36;
    const topHeight = 14;
    const available = Math.max(160, (container.clientWidth || 320) - 4);
    const cell = Math.max(2, Math.min(34, Math.floor((available - labelWidth) / Math.max(cols, 1))));
    const cellHeight = Math.max(6, Math.min(24, cell));
    canvas.width = labelWidth + cols * cell;
    canvas.height = topHeight + rows * cellHeight;
    const ctx = canvas.getContext('2d');
    ctx.fillStyle = '#ffffff';
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    const gap = cell >= 6 ? 1 : 0;
    let nonzero = 0;
    for (let r = 0; r < rows; r++) {
      for (let c = 0; c < cols; c++) {
        const v = data[r * cols + c];
        if (v !== 0) nonzero++;
        ctx.fillStyle = colour(spec.scale, v);
        ctx.fillRect(labelWidth + c * cell, topHeight + r * cellHeight, cell - gap, cellHeight - gap);
      }
    }
    ctx.fillStyle = '#5b6572';
    ctx.font = '10px system-ui, sans-serif';
    ctx.textBaseline = 'middle';
    const rowStep = Math.max(1, Math.ceil(11 / cellHeight));
    for (let r = 0; r < rows; r += rowStep) {
      ctx.fillText(`${spec.rowName === 'pool' ? 'P' : 'L'}${rowLabels[r]}`, 2, topHeight + r * cellHeight + cellHeight / 2);
    }
    const digits = String(Math.max(cols - 1, 0)).length;
    let colStep = 1;
    while (colStep * cell < digits * 6 + 3) colStep *= 2;
    ctx.textAlign = 'center';
    for (let c = 0; c < cols; c += colStep) ctx.fillText(String(c), labelWidth + c * cell + cell / 2, topHeight / 2);

    canvas.dataset.kind = spec.kind;
    canvas.dataset.rows = String(rows);
    canvas.dataset.cols = String(cols);
    if (spec.rowName === 'layer') {
      canvas.dataset.layers = String(rows);
      canvas.dataset.experts = String(cols);
    }
    canvas.dataset.max = String(spec.scale.max === undefined ? '' : spec.scale.max);
    canvas.dataset.nonzero = String(nonzero);
    canvas.dataset.drawn = 'true';
    canvas.setAttribute('role', 'img');
    canvas.setAttribute('aria-label', `${spec.title}: ${rows} ${spec.rowName}s x ${cols} experts`);

    canvas.addEventListener('mousemove', (event) => {
      const box = canvas.getBoundingClientRect();
      const x = (event.clientX - box.left) * (canvas.width / box.width) - labelWidth;
      const y = (event.clientY - box.top) * (canvas.height / box.height) - topHeight;
      const c = Math.floor(x / cell);
      const r = Math.floor(y / cellHeight);
      if (x < 0 || y < 0 || c >= cols || r >= rows) {
        hover.textContent = '';
        return;
      }
      const v = data[r * cols + c];
      const what = spec.hover ? spec.hover(r, c, v) : fmt(v);
      hover.textContent = `${spec.rowName} ${rowLabels[r]}, expert ${c}: ${what}`;
    });
    canvas.addEventListener('mouseleave', () => { hover.textContent = ''; });
    return figure;
  }

  function noteIn(container, text) {
    container.append(el('p', 'note', text));
  }

  // ---- routing from a response ---------------------------------------------------------------

  function expertCount(result) {
    if (result.logits) return result.logits.shape[2];
    if (state.shape) return state.shape.num_experts;
    let max = 0;
    for (const e of result.experts.data) max = Math.max(max, e);
    return max + 1;
  }

  /** The token rows of `result` a scope covers: [first, end). */
  function tokenRange(result, scope) {
    const tokens = result.experts.shape[0];
    const prompt = result.usage ? result.usage.prompt_tokens : null;
    if (prompt === null || prompt === undefined || scope === 'all') return [0, tokens];
    return scope === 'prompt' ? [0, Math.min(prompt, tokens)] : [Math.min(prompt, tokens), tokens];
  }

  /** layers x experts: the share of the scope's tokens routed to each expert at each layer. */
  function routingShare(result, scope) {
    const [, layers, topK] = result.experts.shape;
    const experts = expertCount(result);
    const [first, end] = tokenRange(result, scope);
    const tokens = end - first;
    const counts = new Float64Array(layers * experts);
    let dropped = 0;
    const ids = result.experts.data;
    for (let t = first; t < end; t++) {
      for (let l = 0; l < layers; l++) {
        for (let k = 0; k < topK; k++) {
          const e = ids[(t * layers + l) * topK + k];
          if (e < experts) counts[l * experts + e] += 1;
          else dropped++;
        }
      }
    }
    if (tokens) for (let i = 0; i < counts.length; i++) counts[i] /= tokens;
    return { rows: layers, cols: experts, data: counts, tokens, dropped, topK, layers: result.layers };
  }

  /** layers x experts: the mean softmax of the raw router logits over the scope's tokens. */
  function routerProbabilities(result, scope) {
    const [, layers, experts] = result.logits.shape;
    const [first, end] = tokenRange(result, scope);
    const out = new Float64Array(layers * experts);
    const z = result.logits.data;
    for (let t = first; t < end; t++) {
      for (let l = 0; l < layers; l++) {
        const base = (t * layers + l) * experts;
        let max = -Infinity;
        for (let e = 0; e < experts; e++) max = Math.max(max, z[base + e]);
        let sum = 0;
        for (let e = 0; e < experts; e++) sum += Math.exp(z[base + e] - max);
        for (let e = 0; e < experts; e++) out[l * experts + e] += Math.exp(z[base + e] - max) / sum;
      }
    }
    const tokens = end - first;
    if (tokens) for (let i = 0; i < out.length; i++) out[i] /= tokens;
    return { rows: layers, cols: experts, data: out, tokens, layers: result.layers };
  }

  // ---- columns -------------------------------------------------------------------------------

  function columnProfile(col) {
    return col.manual.value.trim() || col.select.value;
  }

  function setColumnState(col, value, status) {
    col.el.dataset.state = value;
    if (status !== undefined) col.status.textContent = status;
  }

  function showError(box, err) {
    box.textContent = describeError(err);
    box.hidden = false;
  }

  function hideError(box) {
    box.textContent = '';
    box.hidden = true;
  }

  function fillProfileSelect(col) {
    const previous = col.select.value;
    col.select.replaceChildren();
    if (state.bound) {
      col.select.append(new Option(`${state.bound} (your key's profile)`, state.bound));
    } else {
      col.select.append(new Option('unsteered', ''));
      for (const p of state.profiles) col.select.append(new Option(p.id, p.id));
    }
    // until the user picks, a column shows what it was added for (null: the first profile)
    const values = Array.from(col.select.options, (o) => o.value);
    const wanted = col.touched ? previous : col.preferred === null ? values[1] : col.preferred;
    col.select.value = values.includes(wanted) ? wanted : values[0] || '';
  }

  function addColumn(preferred) {
    if (state.columns.length >= MAX_COLUMNS) return;
    const fragment = $('#column-template').content.cloneNode(true);
    const root = fragment.querySelector('.column');
    const col = {
      id: state.nextColumn++,
      el: root,
      select: $('.profile', root),
      budget: $('.budget', root),
      manual: $('.manual-profile', root),
      status: $('.status', root),
      error: $('.error', root),
      text: $('.text', root),
      routingMaps: $('.routing-maps', root),
      profileMaps: $('.profile-maps', root),
      preferred,
      touched: false,
      run: null,
      result: null,
    };
    root.dataset.column = String(col.id);
    if (state.shape) col.budget.max = String(state.shape.top_k);
    fillProfileSelect(col);
    col.select.addEventListener('change', () => {
      col.touched = true;
      showProfileTables(col);
    });
    col.manual.addEventListener('change', () => showProfileTables(col));
    $('.remove', root).addEventListener('click', () => removeColumn(col));
    state.columns.push(col);
    $('#columns').append(root);
    updateColumnButtons();
    showProfileTables(col);
  }

  function removeColumn(col) {
    if (state.columns.length <= 1 || state.controller) return;
    state.columns = state.columns.filter((c) => c !== col);
    col.el.remove();
    updateColumnButtons();
    renderRouting();
  }

  function updateColumnButtons() {
    const running = Boolean(state.controller);
    $('#add-column').disabled = running || state.columns.length >= MAX_COLUMNS;
    for (const col of state.columns) $('.remove', col.el).disabled = running || state.columns.length <= 1;
  }

  // ---- a run ---------------------------------------------------------------------------------

  function numberField(id) {
    const raw = $(id).value.trim();
    return raw === '' ? null : Number(raw);
  }

  function requestBase() {
    const mode = $('#mode').value;
    const body = {
      model: $('#model').value,
      max_tokens: numberField('#max-tokens'),
      temperature: numberField('#temperature'),
      stream: true,
      stream_options: { include_usage: true },
      return_routed_experts: true,
    };
    const minTokens = numberField('#min-tokens');
    if (minTokens) body.min_tokens = minTokens;
    if ($('#logits').checked) body.return_router_logits = true;
    const prompt = $('#prompt').value;
    if (mode === 'chat') body.messages = [{ role: 'user', content: prompt }];
    else body.prompt = prompt;
    for (const key of ['max_tokens', 'temperature']) if (body[key] === null) delete body[key];
    return { path: mode === 'chat' ? '/v1/chat/completions' : '/v1/completions', body };
  }

  async function runColumn(col, request, signal) {
    const profile = columnProfile(col);
    const budget = col.budget.value.trim();
    const body = Object.assign({}, request.body);
    if (profile) body.steering = profile;
    if (budget !== '') body.expert_budget = { top_k: Number(budget) };
    col.run = { profile, budget, unsteered: !profile && budget === '' };
    col.result = null;
    col.text.textContent = '';
    hideError(col.error);
    col.routingMaps.replaceChildren();
    const label = profile ? `profile ${profile}` : 'unsteered';
    setColumnState(col, 'running', `${label}${budget !== '' ? `, budget top_k ${budget}` : ''}: generating…`);
    const received = { experts: null, logits: null, layers: null, usage: null, finish: null };
    try {
      await streamSSE(request.path, body, signal, (chunk) => {
        for (const choice of chunk.choices || []) {
          const delta = choice.text !== undefined ? choice.text : (choice.delta && choice.delta.content) || '';
          if (delta) col.text.textContent += delta;
          if (choice.finish_reason) received.finish = choice.finish_reason;
          if (choice.routed_experts) received.experts = decodeNpy(choice.routed_experts);
          if (choice.router_logits) received.logits = decodeNpy(choice.router_logits);
          if (choice.routed_experts_layers) received.layers = choice.routed_experts_layers;
        }
        if (chunk.usage) received.usage = chunk.usage;
      });
    } catch (err) {
      setColumnState(col, err.name === 'AbortError' ? 'stopped' : 'error', `${label}: ${describeError(err)}`);
      if (err.name !== 'AbortError') showError(col.error, err);
      return;
    }
    if (received.experts) col.result = received;
    const usage = received.usage;
    const parts = [label];
    if (usage) parts.push(`${usage.completion_tokens} tokens generated (prompt ${usage.prompt_tokens})`);
    if (received.finish) parts.push(`finish: ${received.finish}`);
    if (!received.experts) parts.push('no routing came back');
    setColumnState(col, 'done', parts.join(' · '));
  }

  async function runAll() {
    if (state.controller) return;
    hideError($('#global-error'));
    if (!$('#model').value) {
      showError($('#global-error'), new Error('no model: use a key the server accepts, then Run'));
      return;
    }
    const request = requestBase();
    const controller = new AbortController();
    state.controller = controller;
    $('#run').disabled = true;
    $('#stop').disabled = false;
    updateColumnButtons();
    $('#run-state').textContent = 'running…';
    try {
      await Promise.all(state.columns.map((col) => runColumn(col, request, controller.signal)));
    } finally {
      state.controller = null;
      $('#run').disabled = false;
      $('#stop').disabled = true;
      updateColumnButtons();
      $('#run-state').textContent = controller.signal.aborted ? 'stopped' : '';
    }
    renderRouting();
    await Promise.all(state.columns.map(showProfileTables));
    state.runs += 1;
    document.body.dataset.runs = String(state.runs); // the run and all it shows under the texts are done
    refreshUsage();
  }

  // ---- what the columns show under their text ----------------------------------------------

  function renderRouting() {
    const scope = $('#token-scope').value;
    const shares = new Map();
    let max = 0;
    for (const col of state.columns) {
      if (!col.result) continue;
      const share = routingShare(col.result, scope);
      shares.set(col, share);
      for (const v of share.data) max = Math.max(max, v);
    }
    const baseline = state.columns.find((c) => c.run && c.run.unsteered && shares.has(c));
    const diffs = new Map();
    let diffMax = 0;
    for (const [col, share] of shares) {
      const base = baseline ? shares.get(baseline) : null;
      if (!base || col === baseline || base.rows !== share.rows || base.cols !== share.cols) continue;
      const data = share.data.map((v, i) => v - base.data[i]);
      for (const v of data) diffMax = Math.max(diffMax, Math.abs(v));
      diffs.set(col, Object.assign({}, share, { data }));
    }
    for (const col of state.columns) {
      const box = col.routingMaps;
      box.replaceChildren();
      const share = shares.get(col);
      if (!share) continue;
      const dropped = share.dropped ? `, ${share.dropped} slot(s) dropped by the budget` : '';
      heatmap(box, {
        title: `Routing: share of ${share.tokens} tokens per expert (top-${share.topK}${dropped})`,
        kind: 'routing', rows: share.rows, cols: share.cols, data: share.data, rowName: 'layer',
        rowLabels: share.layers, scale: { type: 'seq', max }, unit: 'share of tokens',
        hover: (r, c, v) => `${(100 * v).toFixed(1)}% of tokens`,
      });
      const diff = diffs.get(col);
      if (diff) {
        heatmap(box, {
          title: 'Difference from the unsteered column', kind: 'diff', rows: diff.rows, cols: diff.cols,
          data: diff.data, rowName: 'layer', rowLabels: diff.layers, scale: { type: 'div', max: diffMax },
          unit: 'share of tokens', hover: (r, c, v) => `${v >= 0 ? '+' : ''}${(100 * v).toFixed(1)} points`,
        });
      } else if (col !== baseline) {
        noteIn(box, state.bound
          ? 'No difference view: a key bound to a profile always runs under it, so there is no unsteered column.'
          : 'No difference view: no unsteered column with routing to compare with.');
      }
      if (col.result.logits) {
        const probs = routerProbabilities(col.result, scope);
        heatmap(box, {
          title: 'Router preference: mean softmax of the raw router logits (before steering)',
          kind: 'router-probs', rows: probs.rows, cols: probs.cols, data: probs.data, rowName: 'layer',
          rowLabels: probs.layers, scale: { type: 'seq', max: Math.max(...probs.data) }, unit: 'probability',
        });
      }
    }
  }

  function profileRows(name) {
    if (!state.profileRows.has(name)) {
      state.profileRows.set(name, apiJSON(`/v1/steering/profiles/${encodeURIComponent(name)}?rows=true`));
    }
    return state.profileRows.get(name);
  }

  async function showProfileTables(col) {
    const name = columnProfile(col);
    const box = col.profileMaps;
    box.dataset.profile = name;
    box.replaceChildren();
    if (!name) return;
    let profile;
    try {
      profile = await profileRows(name);
    } catch (err) {
      state.profileRows.delete(name);
      if (box.dataset.profile === name) noteIn(box, `Profile tables of ${name}: ${describeError(err)}`);
      return;
    }
    if (box.dataset.profile !== name) return; // the column changed meanwhile
    box.replaceChildren();
    const bias = profile.rows.bias;
    const mask = profile.rows.mask;
    const layers = bias.length;
    const experts = layers ? bias[0].length : 0;
    const flatBias = Float64Array.from(bias.flat());
    const biasMax = flatBias.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
    const budget = profile.expert_budget ? `, expert budget top_k ${profile.expert_budget.top_k}` : '';
    noteIn(box, `Profile ${profile.name}: alpha ${profile.alpha}${budget}${profile.description ? ` · ${profile.description}` : ''}`);
    heatmap(box, {
      title: `Profile ${profile.name}: bias (alpha folded in)`, kind: 'bias', rows: layers, cols: experts,
      data: flatBias, rowName: 'layer', scale: { type: 'div', max: biasMax }, unit: 'bias',
      hover: (r, c, v) => `bias ${fmt(v)}`,
    });
    heatmap(box, {
      title: `Profile ${profile.name}: include / exclude`, kind: 'mask', rows: layers, cols: experts,
      data: Float64Array.from(mask.flat()), rowName: 'layer', scale: { type: 'mask' },
      hover: (r, c, v) => (v > 0 ? 'include' : v < 0 ? 'exclude' : 'neither'),
    });
  }

  // ---- profiles, models, usage ---------------------------------------------------------------

  async function loadModels() {
    const select = $('#model');
    const previous = select.value;
    const listing = await apiJSON('/v1/models');
    state.models = (listing.data || []).map((m) => m.id);
    select.replaceChildren(...state.models.map((id) => new Option(id, id)));
    if (state.models.includes(previous)) select.value = previous;
  }

  async function loadProfiles() {
    state.profileRows.clear();
    const listing = await apiJSON('/v1/steering/profiles');
    state.profiles = listing.data || [];
    state.bound = listing.bound_profile || null;
    state.shape = listing.model || null;
    const body = $('#profiles-table tbody');
    body.replaceChildren();
    for (const p of state.profiles) {
      const row = el('tr');
      row.dataset.profile = p.id;
      row.append(el('td', null, p.id + (p.id === state.bound ? ' (your key\'s profile)' : '')),
        el('td', null, p.description || ''),
        el('td', null, p.alpha === undefined ? '—' : String(p.alpha)),
        el('td', 'mono', p.content_hash || '—'));
      body.append(row);
    }
    $('#profiles-state').textContent = state.bound
      ? `this key is bound to ${state.bound}: every request it sends runs under it`
      : `${state.profiles.length} profile(s)`;
    const deleteSelect = $('#delete-name');
    deleteSelect.replaceChildren(...state.profiles.map((p) => new Option(p.id, p.id)));
    for (const col of state.columns) {
      if (state.shape) col.budget.max = String(state.shape.top_k);
      fillProfileSelect(col);
      showProfileTables(col);
    }
    const info = state.shape
      ? `${state.models[0] || ''} · ${state.shape.num_layers} layers · ${state.shape.num_experts} experts per pool · top-${state.shape.top_k}`
      : '';
    $('#server-info').textContent = info;
  }

  async function refreshUsage() {
    const box = $('#usage');
    let text;
    try {
      text = await (await api('/metrics')).text();
    } catch (err) {
      box.replaceChildren();
      noteIn(box, `expert usage unavailable: ${describeError(err)}`);
      return;
    }
    const counts = new Map();
    let pools = 0;
    let experts = 0;
    const sample = /^unipool_expert_tokens_total\{([^}]*)\}\s+(\S+)/gm;
    let match;
    while ((match = sample.exec(text)) !== null) {
      const pool = Number((/pool="(\d+)"/.exec(match[1]) || [])[1]);
      const expert = Number((/expert="(\d+)"/.exec(match[1]) || [])[1]);
      if (!Number.isInteger(pool) || !Number.isInteger(expert)) continue;
      counts.set(`${pool}:${expert}`, Number(match[2]));
      pools = Math.max(pools, pool + 1);
      experts = Math.max(experts, expert + 1);
    }
    box.replaceChildren();
    if (!counts.size) {
      noteIn(box, 'This server exports no per-expert counts (routing statistics off, or more pools x experts than '
        + 'UNIPOOL_METRICS_MAX_EXPERT_SERIES).');
      return;
    }
    const raw = new Float64Array(pools * experts);
    for (const [key, value] of counts) {
      const [p, e] = key.split(':').map(Number);
      raw[p * experts + e] = value;
    }
    const share = new Float64Array(raw.length);
    let total = 0;
    for (let p = 0; p < pools; p++) {
      let sum = 0;
      for (let e = 0; e < experts; e++) sum += raw[p * experts + e];
      total += sum;
      for (let e = 0; e < experts; e++) share[p * experts + e] = sum ? raw[p * experts + e] / sum : 0;
    }
    heatmap(box, {
      title: `Expert usage per pool (${total.toLocaleString()} token-slots so far)`, kind: 'usage', rows: pools,
      cols: experts, data: share, rowName: 'pool', scale: { type: 'seq', max: Math.max(...share) },
      unit: "share of the pool's token-slots",
      hover: (r, c, v) => `${(100 * v).toFixed(1)}% of the pool (${raw[r * experts + c].toLocaleString()} token-slots)`,
    });
    $('#usage-state').textContent = `read ${new Date().toLocaleTimeString()}`;
  }

  async function refreshAll() {
    hideError($('#global-error'));
    try {
      await loadModels();
      await loadProfiles();
    } catch (err) {
      showError($('#global-error'), err);
    }
    state.refreshes += 1;
    document.body.dataset.refreshes = String(state.refreshes); // the page has asked with the current key
    refreshUsage();
  }

  // ---- the key and the admin actions ---------------------------------------------------------

  function showKeyState() {
    $('#key-state').textContent = apiKey() ? 'a key is set for this tab' : 'no key set';
  }

  function useKey() {
    const input = $('#key');
    if (input.value) sessionStorage.setItem(KEY_STORAGE, input.value);
    else sessionStorage.removeItem(KEY_STORAGE);
    input.value = '';
    showKeyState();
    refreshAll();
  }

  function forgetKey() {
    sessionStorage.removeItem(KEY_STORAGE);
    $('#key').value = '';
    showKeyState();
    refreshAll();
  }

  async function adminAction(action) {
    const result = $('#admin-result');
    result.textContent = '';
    hideError($('#admin-error'));
    try {
      const message = await action();
      // the message appears once the lists show the change, so what it says is what the page shows
      await loadProfiles();
      result.textContent = message;
    } catch (err) {
      showError($('#admin-error'), err);
    }
  }

  function upload() {
    adminAction(async () => {
      const file = $('#upload-file').files[0];
      if (!file) throw new Error('choose a profile file first');
      const replace = $('#upload-replace').checked ? '?replace=true' : '';
      const profile = await apiJSON(`/v1/steering/profiles${replace}`, {
        method: 'POST', body: file, headers: { 'Content-Type': 'application/octet-stream' },
      });
      return `uploaded profile ${profile.name} (content hash ${profile.content_hash})`;
    });
  }

  function remove() {
    const name = $('#delete-name').value;
    if (!name || !window.confirm(`Delete profile ${name}?`)) return;
    adminAction(async () => {
      const answer = await apiJSON(`/v1/steering/profiles/${encodeURIComponent(name)}`, { method: 'DELETE' });
      return `deleted profile ${answer.id}; ${answer.running_requests} running request(s) keep it until they end`;
    });
  }

  // ---- start ---------------------------------------------------------------------------------

  function start() {
    $('#key-use').addEventListener('click', useKey);
    $('#key').addEventListener('keydown', (event) => { if (event.key === 'Enter') useKey(); });
    $('#key-forget').addEventListener('click', forgetKey);
    $('#run').addEventListener('click', runAll);
    $('#stop').addEventListener('click', () => { if (state.controller) state.controller.abort(); });
    $('#add-column').addEventListener('click', () => addColumn());
    $('#token-scope').addEventListener('change', renderRouting);
    $('#profiles-refresh').addEventListener('click', () => {
      hideError($('#global-error'));
      loadProfiles().catch((err) => showError($('#global-error'), err));
    });
    $('#usage-refresh').addEventListener('click', refreshUsage);
    $('#upload').addEventListener('click', upload);
    $('#delete').addEventListener('click', remove);
    let resizeTimer = null;
    window.addEventListener('resize', () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => {
        renderRouting();
        for (const col of state.columns) showProfileTables(col);
        refreshUsage();
      }, 250);
    });
    addColumn('');
    addColumn(null);
    showKeyState();
    refreshAll();
  }

  document.addEventListener('DOMContentLoaded', start);
})();
