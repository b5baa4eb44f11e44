/* wakelab trajectory panels: drawn on a canvas, labels as DOM boxes placed so that none overlaps another.
   One Panel draws one trajectory (one run) in one projection; a page holds one or more panels and one step slider
   that moves all of them (and their distance charts) together. Positions arrive quantised to 0..Q over the view's
   extent; the camera (zoom and pan, shared by the panels of one page) maps them to the screen. Nothing is fetched. */
const WL = (function () {
  const Q = 10000, M = 24, WORD = '#d95f02', MEANING = '#1b9e77', AWAY = '#b2182b', FONT = '12px system-ui,sans-serif';
  const TRAIL = 30; // frames of trail drawn, fading with age

  function el(tag, cls, parent) { const e = document.createElement(tag); if (cls) e.className = cls; if (parent) parent.appendChild(e); return e; }

  function Camera() { this.sx = 1; this.sy = 1; this.ox = 0; this.oy = 0; this.listeners = []; }
  Camera.prototype.fit = function (b, W, H) { // b: [x0,x1,y0,y1] in quantised units
    const w = Math.max(b[1] - b[0], 50), h = Math.max(b[3] - b[2], 50);
    this.sx = (W - 2 * M) / w; this.sy = (H - 2 * M) / h; this.ox = M - b[0] * this.sx; this.oy = H - M + b[2] * this.sy;
    this.changed();
  };
  Camera.prototype.zoom = function (f, mx, my) {
    this.ox = mx - (mx - this.ox) * f; this.oy = my - (my - this.oy) * f; this.sx *= f; this.sy *= f; this.changed();
  };
  Camera.prototype.pan = function (dx, dy) { this.ox += dx; this.oy += dy; this.changed(); };
  Camera.prototype.changed = function () { for (const f of this.listeners) f(); };

  function Panel(root, D, opt) {
    opt = opt || {};
    const P = this, W = opt.width || 760, H = opt.height || 600, CH = opt.chartHeight || 170;
    P.D = D; P.v = opt.view || 0; P.f = D.steps.length - 1; P.hot = -1; P.cam = opt.camera || new Camera();
    const box = el('div', 'panel', root);
    box.style.width = W + 'px';
    if (opt.caption) { const c = el('div', 'caption', box); c.textContent = opt.caption; }
    const wrap = el('div', 'wrap', box);
    wrap.style.width = W + 'px'; wrap.style.height = H + 'px';
    const C = el('canvas', 'plot', wrap); C.width = W; C.height = H;
    const layer = el('div', 'labels', wrap), tip = el('div', 'tip', wrap);
    P.canvas = C; P.layer = layer; P.tip = tip; P.W = W; P.H = H;
    const X = C.getContext('2d');
    const T = D.words.length, F = D.steps.length, hasM = !!D.dist;
    P.summary = el('div', 'summary', box);
    let K = null, KX = null;
    if (hasM && opt.chart !== false) { K = el('canvas', 'chart', box); K.width = W; K.height = CH; KX = K.getContext('2d'); P.chart = K; }
    const view = () => D.views[P.v];
    const sx = q => P.cam.ox + q * P.cam.sx, sy = q => P.cam.oy - q * P.cam.sy;
    const at = (f, t) => { const a = view().xy[f]; return [sx(a[2 * t]), sy(a[2 * t + 1])]; };
    const meant = t => { const m = view().mxy; return m[2 * t] === null ? null : [sx(m[2 * t]), sy(m[2 * t + 1])]; };

    P.bounds = function (all) { // what "fit new tokens" (all=false) or "fit all" (all=true) shows, in quantised units
      if (all) return [0, Q, 0, Q];
      let x0 = 1e9, x1 = -1e9, y0 = 1e9, y1 = -1e9;
      const add = (x, y) => { if (x === null) return; x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); };
      for (const a of view().xy) for (let t = 0; t < T; t++) add(a[2 * t], a[2 * t + 1]);
      const m = view().mxy; for (let t = 0; t < T; t++) add(m[2 * t], m[2 * t + 1]);
      if (x0 > x1) return [0, Q, 0, Q];
      const px = (x1 - x0) * 0.08 + 40, py = (y1 - y0) * 0.08 + 40;
      return [x0 - px, x1 + px, y0 - py, y1 + py];
    };
    P.fit = function (all) { P.cam.fit(P.bounds(all), W, H); };

    function density(f) {
      const d = view().dens; if (!d || !d.length) return;
      const g = d[f], b = D.bins, cw = Q / b; let mx = 1;
      for (let i = 1; i < g.length; i += 2) mx = Math.max(mx, g[i]);
      for (let i = 0; i < g.length; i += 2) {
        const cell = g[i], ix = cell % b, iy = Math.floor(cell / b);
        X.fillStyle = 'rgba(49,130,189,' + (0.12 + 0.5 * g[i + 1] / mx) + ')';
        const x = sx(ix * cw), y = sy((iy + 1) * cw);
        X.fillRect(x, y, sx((ix + 1) * cw) - x, sy(iy * cw) - y);
      }
    }

    function arrow(a, b) {
      const dx = b[0] - a[0], dy = b[1] - a[1], len = Math.hypot(dx, dy); if (len < 6) return;
      X.save(); X.setLineDash([4, 3]); X.strokeStyle = 'rgba(217,95,2,.55)'; X.lineWidth = 1;
      X.beginPath(); X.moveTo(a[0], a[1]); X.lineTo(b[0] - dx / len * 4, b[1] - dy / len * 4); X.stroke(); X.restore();
      const ux = dx / len, uy = dy / len, hx = b[0] - ux * 4, hy = b[1] - uy * 4;
      X.fillStyle = 'rgba(217,95,2,.8)'; X.beginPath(); X.moveTo(hx, hy); X.lineTo(hx - ux * 8 - uy * 4, hy - uy * 8 + ux * 4);
      X.lineTo(hx - ux * 8 + uy * 4, hy - uy * 8 - ux * 4); X.closePath(); X.fill();
    }

    function placeLabels(f) {
      layer.textContent = ''; X.font = FONT;
      const placed = [], out = [], n = Math.min(D.labelMax, D.labelOrder.length);
      const free = (b) => b[0] >= 2 && b[1] >= 2 && b[0] + b[2] <= W - 2 && b[1] + b[3] <= H - 2 &&
        placed.every(o => b[0] + b[2] + 3 <= o[0] || o[0] + o[2] + 3 <= b[0] || b[1] + b[3] + 1 <= o[1] || o[1] + o[3] + 1 <= b[1]);
      const put = (x, y, text, cls) => {
        const w = Math.ceil(X.measureText(text).width) + 2, h = 15;
        for (const [dx, dy] of [[6, -h - 2], [6, 2], [-6 - w, -h - 2], [-6 - w, 2], [-w / 2, -h - 7], [-w / 2, 6]]) {
          const b = [Math.round(x + dx), Math.round(y + dy), w, h];
          if (free(b)) { placed.push(b); out.push([b, text, cls]); return true; }
        }
        return false;
      };
      const shownMeanings = {};
      for (let i = 0; i < n; i++) {
        const t = D.labelOrder[i], p = at(f, t);
        if (p[0] < 0 || p[0] > W || p[1] < 0 || p[1] > H) continue;
        put(p[0], p[1], D.words[t], 'lbl word');
      }
      if (D.meaning) for (let i = 0; i < n; i++) {
        const t = D.labelOrder[i], m = meant(t), w = D.meaning[t];
        if (!m || !w || shownMeanings[w]) continue;
        if (m[0] < 0 || m[0] > W || m[1] < 0 || m[1] > H) continue;
        if (put(m[0], m[1], w, 'lbl meaning')) shownMeanings[w] = 1;
      }
      for (const [b, text, cls] of out) {
        const s = el('span', cls, layer); s.textContent = text;
        s.style.left = b[0] + 'px'; s.style.top = b[1] + 'px'; s.style.width = b[2] + 'px';
      }
      P.labelled = out.length;
    }

    P.draw = function (f) {
      if (f !== undefined) P.f = Math.max(0, Math.min(F - 1, f));
      f = P.f; X.clearRect(0, 0, W, H); density(f);
      X.fillStyle = '#c8c8c8'; const B = view().base;
      for (let i = 0; i < B.length; i += 2) { const x = sx(B[i]), y = sy(B[i + 1]); if (x > -2 && x < W + 2 && y > -2 && y < H + 2) X.fillRect(x - 1, y - 1, 2, 2); }
      if (D.meaning) { // thin line word -> meaning word, and the meaning word as a marked base point
        X.strokeStyle = 'rgba(27,158,119,.45)'; X.lineWidth = 1; X.setLineDash([2, 3]);
        for (let t = 0; t < T; t++) { const m = meant(t); if (!m) continue; const p = at(f, t); X.beginPath(); X.moveTo(p[0], p[1]); X.lineTo(m[0], m[1]); X.stroke(); }
        X.setLineDash([]); X.lineWidth = 1.5; X.strokeStyle = MEANING; X.fillStyle = '#fff';
        for (let t = 0; t < T; t++) { const m = meant(t); if (!m) continue; X.beginPath(); X.moveTo(m[0], m[1] - 5); X.lineTo(m[0] + 5, m[1]);
          X.lineTo(m[0], m[1] + 5); X.lineTo(m[0] - 5, m[1]); X.closePath(); X.fill(); X.stroke(); }
      }
      X.lineWidth = 1.3; // fading trails: the older a segment, the fainter
      for (let k = Math.max(1, f - TRAIL + 1); k <= f; k++) {
        X.strokeStyle = 'rgba(217,95,2,' + (0.08 + 0.6 * Math.pow((k - f + TRAIL) / TRAIL, 1.5)).toFixed(3) + ')';
        X.beginPath();
        for (let t = 0; t < T; t++) { const a = at(k - 1, t), b = at(k, t); X.moveTo(a[0], a[1]); X.lineTo(b[0], b[1]); }
        X.stroke();
      }
      for (let t = 0; t < T; t++) arrow(at(0, t), at(f, t));
      for (let t = 0; t < T; t++) {
        const p = at(f, t); X.fillStyle = t === P.hot ? '#7a2b00' : WORD; X.beginPath(); X.arc(p[0], p[1], t === P.hot ? 5 : 3.5, 0, 7); X.fill();
      }
      placeLabels(f); P.drawChart(); P.say();
    };

    P.say = function () {
      if (!hasM) { P.summary.textContent = ''; return; }
      const a = D.dist[0], b = D.dist[P.f]; let near = 0, far = 0, same = 0, n = 0;
      for (let t = 0; t < T; t++) { if (a[t] === null || b[t] === null) continue; n++; const d = b[t] - a[t]; if (d < -1e-4) near++; else if (d > 1e-4) far++; else same++; }
      P.summary.textContent = 'Of ' + n + ' words with a meaning word, ' + near + ' moved closer to it and ' + far +
        ' moved away (cosine distance, step ' + D.steps[0] + ' → ' + D.steps[P.f] + ')' + (same ? '; ' + same + ' did not move' : '') + '.';
      P.counts = [near, far];
    };

    P.drawChart = function () {
      if (!KX) return;
      const w = K.width, h = K.height, L = 44, R = 10, TOP = 8, BOT = 22; KX.clearRect(0, 0, w, h);
      let lo = 1e9, hi = -1e9; for (const r of D.dist) for (const v of r) if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
      if (lo > hi) return; if (hi - lo < 1e-3) { hi += 0.01; lo -= 0.01; }
      const s0 = D.steps[0], s1 = Math.max(D.steps[F - 1], s0 + 1);
      const cx = s => L + (s - s0) / (s1 - s0) * (w - L - R), cy = v => TOP + (hi - v) / (hi - lo) * (h - TOP - BOT);
      KX.strokeStyle = '#999'; KX.lineWidth = 1; KX.beginPath(); KX.moveTo(L, TOP); KX.lineTo(L, h - BOT); KX.lineTo(w - R, h - BOT); KX.stroke();
      KX.fillStyle = '#555'; KX.font = '11px system-ui,sans-serif';
      KX.fillText(hi.toFixed(2), 4, TOP + 8); KX.fillText(lo.toFixed(2), 4, h - BOT); KX.fillText('step ' + s0, L, h - 6);
      KX.fillText('step ' + D.steps[F - 1], w - R - 60, h - 6);
      KX.save(); KX.translate(12, h / 2 + 30); KX.rotate(-Math.PI / 2); KX.fillText('cos. distance', 0, 0); KX.restore();
      for (let t = 0; t < T; t++) {
        if (D.dist[0][t] === null) continue;
        const closer = D.dist[P.f][t] <= D.dist[0][t];
        KX.strokeStyle = t === P.hot ? '#000' : (closer ? 'rgba(27,158,119,.55)' : 'rgba(178,24,43,.55)');
        KX.lineWidth = t === P.hot ? 2.2 : 1; KX.beginPath();
        for (let k = 0; k <= P.f; k++) { const v = D.dist[k][t]; if (k) KX.lineTo(cx(D.steps[k]), cy(v)); else KX.moveTo(cx(D.steps[k]), cy(v)); }
        KX.stroke();
      }
      const x = cx(D.steps[P.f]); KX.strokeStyle = '#333'; KX.setLineDash([3, 3]); KX.beginPath(); KX.moveTo(x, TOP); KX.lineTo(x, h - BOT); KX.stroke(); KX.setLineDash([]);
      if (P.hot >= 0 && D.dist[0][P.hot] !== null) { KX.fillStyle = '#000'; KX.fillText(D.words[P.hot] + ' → ' + D.meaning[P.hot], L + 6, TOP + 10); }
    };

    function hover(ev) {
      const r = C.getBoundingClientRect(), mx = ev.clientX - r.left, my = ev.clientY - r.top, f = P.f;
      let best = -1, bd = 100;
      for (let t = 0; t < T; t++) { const p = at(f, t), d = (p[0] - mx) ** 2 + (p[1] - my) ** 2; if (d < bd) { bd = d; best = t; } }
      tip.textContent = '';
      if (best >= 0) {
        const b = el('b', null, tip); b.textContent = D.words[best];
        tip.appendChild(document.createTextNode(' at step ' + D.steps[f])); el('br', null, tip);
        if (D.meaning && D.meaning[best]) {
          tip.appendChild(document.createTextNode('meaning: ' + D.meaning[best] + ', cosine distance ' + D.dist[f][best].toFixed(3) +
            ' (step ' + D.steps[0] + ': ' + D.dist[0][best].toFixed(3) + ')')); el('br', null, tip);
        }
        tip.appendChild(document.createTextNode('nearest base tokens: ' + (D.nb[f][best] || []).map(i => D.vocab[i]).join(', ')));
      } else {
        let bb = -1, bm = -1, bd2 = 49;
        if (D.meaning) for (let t = 0; t < T; t++) { const m = meant(t); if (!m) continue; const d = (m[0] - mx) ** 2 + (m[1] - my) ** 2; if (d < bd2) { bd2 = d; bm = t; } }
        if (bm >= 0) tip.textContent = 'meaning word: ' + D.meaning[bm] + ' (of ' + D.words[bm] + ')';
        else {
          const B = view().base; for (let i = 0; i < B.length; i += 2) { const d = (sx(B[i]) - mx) ** 2 + (sy(B[i + 1]) - my) ** 2; if (d < bd2) { bd2 = d; bb = i / 2; } }
          if (bb < 0) { tip.style.display = 'none'; if (P.hot !== -1) { P.hot = -1; P.draw(); } return; }
          tip.textContent = 'base token: ' + D.baseWords[bb];
        }
      }
      tip.style.display = 'block'; tip.style.left = Math.min(mx + 12, W - 200) + 'px'; tip.style.top = (my + 10) + 'px';
      if (best !== P.hot) { P.hot = best; P.draw(); }
    }
    let drag = null;
    C.addEventListener('mousedown', ev => { drag = [ev.clientX, ev.clientY]; });
    window.addEventListener('mouseup', () => { drag = null; });
    C.addEventListener('mousemove', ev => {
      if (drag) { P.cam.pan(ev.clientX - drag[0], ev.clientY - drag[1]); drag = [ev.clientX, ev.clientY]; tip.style.display = 'none'; return; }
      hover(ev);
    });
    C.addEventListener('mouseleave', () => { tip.style.display = 'none'; if (P.hot !== -1) { P.hot = -1; P.draw(); } });
    C.addEventListener('wheel', ev => {
      ev.preventDefault(); const r = C.getBoundingClientRect();
      P.cam.zoom(Math.exp(-ev.deltaY * 0.0015), ev.clientX - r.left, ev.clientY - r.top);
    }, { passive: false });
    P.cam.listeners.push(() => P.draw());
  }

  /* One slider (and play button) moving every panel; steps: the union of the panels' steps. */
  function Slider(panels, slider, label, play) {
    const steps = [...new Set(panels.flatMap(p => p.D.steps))].sort((a, b) => a - b);
    slider.min = 0; slider.max = steps.length - 1; slider.value = steps.length - 1;
    const frameOf = (p, s) => { let f = 0; p.D.steps.forEach((v, i) => { if (v <= s) f = i; }); return f; };
    function go(i) { const s = steps[i]; for (const p of panels) p.draw(frameOf(p, s)); label.textContent = s + ' (' + (i + 1) + '/' + steps.length + ')'; }
    slider.addEventListener('input', () => go(+slider.value));
    let timer = null;
    play.addEventListener('click', function () {
      if (timer) { clearInterval(timer); timer = null; this.textContent = 'play'; return; }
      this.textContent = 'pause'; if (+slider.value >= steps.length - 1) slider.value = 0;
      timer = setInterval(() => { const v = +slider.value + 1; if (v >= steps.length) { clearInterval(timer); timer = null; play.textContent = 'play'; return; }
        slider.value = v; go(v); }, 120);
    });
    go(steps.length - 1);
    return { go: go, steps: steps };
  }

  return { Panel: Panel, Camera: Camera, Slider: Slider };
})();
