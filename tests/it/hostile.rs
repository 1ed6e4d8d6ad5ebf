//! Hostile publishers and inputs on the gateway's LAN (issue 11, sources).
