/* The dashboard's client-side callbacks (Dash serves this folder and loads every .js file in it); the Python side
   names them with ClientsideFunction("revacnn", <name>). */
window.dash_clientside = Object.assign({}, window.dash_clientside);

/* The network figure's requests on the way, counted at the page's fetch (Dash sends its callbacks with it): the
   tick skips the network while one is open (tabTicks). A big model's figure that took longer than a tick was asked
   for again and again and never drawn; Dash's own "running" flag cannot say this, as a second request (a click while
   a refresh is on the way) is cleared by the first one's end. A failed request counts as ended. */
window.__revacnnNet = window.__revacnnNet || {open: 0, sent: 0};
if (!window.__revacnnNetFetch) {
    window.__revacnnNetFetch = window.fetch;
    window.fetch = function(resource, options) {
        const body = options && typeof options.body === 'string' ? options.body : '';
        const url = typeof resource === 'string' ? resource : (resource && resource.url) || '';
        if (url.indexOf('_dash-update-component') < 0 || body.indexOf('net-graph.figure') < 0) {
            return window.__revacnnNetFetch.apply(this, arguments);
        }
        const net = window.__revacnnNet;
        net.open += 1;
        net.sent += 1;
        net.lastSent = performance.now();   // benchmarks/dashboard_browser.py: a request → its figure drawn
        const done = () => { net.open -= 1; };
        const sent = window.__revacnnNetFetch.apply(this, arguments);
        sent.then(done, done);
        return sent;
    };
}
window.dash_clientside.revacnn = Object.assign({}, window.dash_clientside.revacnn, {

    /* The page's tick, passed on to the views of the tab shown (and at once to a tab when it is opened); the other
       tabs' ticks stay put, so their callbacks send no request. "layers" feeds the layer menus of the embedding and
       filters tabs. Each value carries the time, so opening a tab always counts as a change. The outputs' order is
       TAB_TICKS (views/page.py). The network's tick waits while its figure is on the way (networkBusy). */
    tabTicks: function(n, tab) {
        const stamp = [n, Date.now()];
        const nu = window.dash_clientside.no_update;
        const netFree = window.__revacnnNet.open === 0;
        return [tab === 'training' ? stamp : nu, tab === 'network' && netFree ? stamp : nu, tab === 'embedding' ? stamp : nu,
                tab === 'filters' ? stamp : nu, (tab === 'embedding' || tab === 'filters') ? stamp : nu,
                tab === 'explore' ? stamp : nu, tab === 'compare' ? stamp : nu];
    },

    /* The network's jitter: requestAnimationFrame moves the nodes' SVG points by their amplitudes (no server round
       trip per frame), every second display frame (30 per second on a 60 Hz display). */
    jitter: function(anim) {
        const R = window.__revacnn || (window.__revacnn = {frames: 0, moved: 0});
        R.anim = anim;
        if (!R.running) {
            R.running = true;
            let last = 0;
            const re = /translate\(([-0-9.e]+)[ ,]+([-0-9.e]+)\)/;
            const frame = (t) => {
                requestAnimationFrame(frame);
                if (t - last < 25) { return; }
                last = t;
                const a = R.anim;
                if (!a || !a.amp) { return; }
                const gd = document.getElementById('net-graph');
                if (!gd) { return; }
                // Find the nodes' trace group by uid (d3 binds each group to its calcdata, whose [0].trace is the
                // trace): Plotly draws no group for an empty trace, so a position would shift when a path bucket
                // empties.
                let tr = null;
                for (const el of gd.querySelectorAll('.scatterlayer .trace')) {
                    const d = el.__data__;
                    if (d && d[0] && d[0].trace && d[0].trace.uid === a.uid) { tr = el; }
                }
                if (!tr) { return; }
                const pts = tr.querySelectorAll('path.point');
                R.frames += 1;
                for (let i = 0; i < pts.length && i < a.amp.length; i++) {
                    const el = pts[i];
                    const cur = el.getAttribute('transform');
                    if (cur !== el._rlast) { el._rbase = cur; }
                    const m = re.exec(el._rbase || '');
                    const amp = a.amp[i];
                    if (!m || !(amp > 0.05)) { continue; }
                    const x = parseFloat(m[1]) + (Math.random() * 2 - 1) * amp;
                    const y = parseFloat(m[2]) + (Math.random() * 2 - 1) * amp;
                    const s = 'translate(' + x.toFixed(2) + ',' + y.toFixed(2) + ')';
                    el.setAttribute('transform', s);
                    el._rlast = s;
                    R.moved += 1;
                }
            };
            requestAnimationFrame(frame);
        }
        return window.dash_clientside.no_update;
    },

    /* Drag steering: press on a point of the embedding, drop it elsewhere. Installed once on the document (capture
       phase, so Plotly's zoom-drag does not start); the drop goes to the server through the 'emb-drop' store. */
    drag: function(data) {
        if (window.__revacnnDrag) { return window.dash_clientside.no_update; }
        window.__revacnnDrag = {drops: 0};
        let drag = null;
        const graph = () => document.querySelector('#emb-graph .js-plotly-plot');
        const points = (gd) => Array.from(gd.querySelectorAll('.scatterlayer .trace:first-child path.point'));
        document.addEventListener('mousedown', (ev) => {
            const gd = graph();
            if (!gd || !gd.contains(ev.target)) { return; }
            let best = -1, bestD = 12;
            points(gd).forEach((el, i) => {
                const r = el.getBoundingClientRect();
                const d = Math.hypot(ev.clientX - (r.left + r.width / 2), ev.clientY - (r.top + r.height / 2));
                if (d < bestD) { bestD = d; best = i; }
            });
            if (best < 0) { return; }
            const el = points(gd)[best];
            drag = {idx: best, el: el, x0: ev.clientX, y0: ev.clientY, base: el.getAttribute('transform') || ''};
            ev.stopPropagation();
            ev.preventDefault();
        }, true);
        document.addEventListener('mousemove', (ev) => {
            if (!drag) { return; }
            const m = /translate\(([-0-9.e]+)[ ,]+([-0-9.e]+)\)/.exec(drag.base);
            if (m) {
                drag.el.setAttribute('transform', 'translate(' + (parseFloat(m[1]) + ev.clientX - drag.x0) + ','
                                     + (parseFloat(m[2]) + ev.clientY - drag.y0) + ')');
            }
            ev.stopPropagation();
        }, true);
        document.addEventListener('mouseup', (ev) => {
            if (!drag) { return; }
            const d = drag;
            drag = null;
            ev.stopPropagation();
            if (Math.hypot(ev.clientX - d.x0, ev.clientY - d.y0) < 4) { return; }
            const gd = graph();
            const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
            const box = gd.getBoundingClientRect();
            const x = xa.p2d(ev.clientX - box.left - xa._offset), y = ya.p2d(ev.clientY - box.top - ya._offset);
            window.__revacnnDrag.drops += 1;
            window.dash_clientside.set_props('emb-drop', {data: {index: d.idx, x: x, y: y, t: Date.now()}});
        }, true);
        return window.dash_clientside.no_update;
    },
});
