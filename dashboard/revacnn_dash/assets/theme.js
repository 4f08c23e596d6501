/* The dark theme's reach into Plotly: Mantine and the page's CSS colour everything else, but a figure's background,
   text and grid are in its layout (built on the server). After each draw of a graph while the page is dark (the
   body has class rv-dark), the figure's chrome is restyled; colour scales and traces are left as they are, so every
   encoding reads the same in both themes. Light figures are left untouched. */
(function () {
    const DARK = {paper_bgcolor: '#1a1b1e', plot_bgcolor: '#25262b', 'font.color': '#c1c2c5'};
    const AXIS = {gridcolor: '#373a40', zerolinecolor: '#4a4d55', linecolor: '#4a4d55'};

    function restyle(gd) {
        if (!document.body.classList.contains('rv-dark') || !gd.layout || gd.__rvDarkBusy) { return; }
        if (gd.layout.paper_bgcolor === DARK.paper_bgcolor) { return; }
        const update = Object.assign({}, DARK);
        Object.keys(gd.layout).filter(k => /^[xy]axis\d*$/.test(k)).forEach(axis => {
            Object.keys(AXIS).forEach(p => { update[axis + '.' + p] = AXIS[p]; });
        });
        gd.__rvDarkBusy = true;
        window.Plotly.relayout(gd, update).finally(() => { gd.__rvDarkBusy = false; });
    }

    function watch(gd) {
        if (gd.__rvDarkWatched || !gd.on) { return; }
        gd.__rvDarkWatched = true;
        gd.on('plotly_afterplot', () => restyle(gd));
        restyle(gd);
    }

    window.revacnnTheme = {
        apply: function (dark) {
            document.body.classList.toggle('rv-dark', !!dark);
            document.querySelectorAll('.js-plotly-plot').forEach(gd => {
                if (dark) { watch(gd); restyle(gd); }
                else if (gd.layout && gd.layout.paper_bgcolor === DARK.paper_bgcolor) {
                    const update = {paper_bgcolor: '#fff', plot_bgcolor: '#e5ecf6', 'font.color': '#2a3f5f'};
                    Object.keys(gd.layout).filter(k => /^[xy]axis\d*$/.test(k)).forEach(axis => {
                        update[axis + '.gridcolor'] = '#fff';
                        update[axis + '.zerolinecolor'] = '#fff';
                    });
                    window.Plotly.relayout(gd, update);
                }
            });
        },
    };
    // Graphs drawn later (another tab opened, a figure replaced) are watched as they appear.
    new MutationObserver(() => {
        if (document.body.classList.contains('rv-dark')) {
            document.querySelectorAll('.js-plotly-plot').forEach(watch);
        }
    }).observe(document.documentElement, {childList: true, subtree: true});

    window.dash_clientside = Object.assign({}, window.dash_clientside);
    window.dash_clientside.theme = {
        /* The theme switch (its state persists in the browser): Mantine's colour scheme, the page's class, the
           graphs' chrome. */
        toggle: function (dark) {
            window.revacnnTheme.apply(dark);
            return dark ? 'dark' : 'light';
        },
    };
})();
