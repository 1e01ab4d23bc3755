"""The coordinator's status page: plain HTML, CSS and JavaScript, no build step, no CDN."""
