/* The theme switch (its state persists in the browser): Mantine's colour scheme (the callback's output) and the
   page's class, which assets/revacnn.css uses for the Dash core components and the figures' chrome. */
window.dash_clientside = Object.assign({}, window.dash_clientside);
window.dash_clientside.theme = {
    toggle: function (dark) {
        document.body.classList.toggle('rv-dark', !!dark);
        return dark ? 'dark' : 'light';
    },
};
