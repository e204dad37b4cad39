// POP3conneX console: the only script. Drives the passkey buttons
// (`button[data-webauthn]`): asks the server for options, calls
// navigator.credentials.create (data-webauthn="create") or .get ("get"),
// posts the credential back as JSON and navigates on success.
//
// Button attributes: data-begin, data-finish (same-origin paths),
// data-next (where to go when the finish answer names no page),
// data-label-input (id of the input holding a new key's name).
// begin answers {"publicKey": {...}} with binary fields as base64url;
// finish answers {"next": "/path"} or an empty body.
"use strict";

(function () {
  function b64urlToBuf(s) {
    var b64 = s.replace(/-/g, "+").replace(/_/g, "/");
    while (b64.length % 4) b64 += "=";
    var bin = atob(b64);
    var out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out.buffer;
  }

  function bufToB64url(buf) {
    var bytes = new Uint8Array(buf);
    var bin = "";
    for (var i = 0; i < bytes.length; i++) bin += String.fromCharCode(bytes[i]);
    return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  // Only paths of this origin: "/x", never "//host" or "https://...".
  function safePath(p) {
    return typeof p === "string" && p.charAt(0) === "/" && p.charAt(1) !== "/" && p.charAt(1) !== "\\" ? p : null;
  }

  function creationOptions(pk) {
    var o = Object.assign({}, pk);
    o.challenge = b64urlToBuf(pk.challenge);
    o.user = Object.assign({}, pk.user, { id: b64urlToBuf(pk.user.id) });
    if (pk.excludeCredentials) {
      o.excludeCredentials = pk.excludeCredentials.map(function (c) {
        return Object.assign({}, c, { id: b64urlToBuf(c.id) });
      });
    }
    return o;
  }

  function requestOptions(pk) {
    var o = Object.assign({}, pk);
    o.challenge = b64urlToBuf(pk.challenge);
    if (pk.allowCredentials) {
      o.allowCredentials = pk.allowCredentials.map(function (c) {
        return Object.assign({}, c, { id: b64urlToBuf(c.id) });
      });
    }
    return o;
  }

  function credentialJson(cred) {
    var r = cred.response;
    var response = { clientDataJSON: bufToB64url(r.clientDataJSON) };
    if (r.attestationObject) {
      response.attestationObject = bufToB64url(r.attestationObject);
      if (typeof r.getTransports === "function") response.transports = r.getTransports();
    }
    if (r.authenticatorData) {
      response.authenticatorData = bufToB64url(r.authenticatorData);
      response.signature = bufToB64url(r.signature);
      response.userHandle = r.userHandle ? bufToB64url(r.userHandle) : null;
    }
    return {
      id: cred.id,
      rawId: bufToB64url(cred.rawId),
      type: cred.type,
      response: response,
      extensions: cred.getClientExtensionResults ? cred.getClientExtensionResults() : {},
    };
  }

  function postJson(path, body) {
    return fetch(path, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(body),
    }).then(function (res) {
      return res.text().then(function (text) {
        var data = null;
        if (text) {
          try {
            data = JSON.parse(text);
          } catch (e) {
            data = null;
          }
        }
        if (!res.ok) {
          var msg = data && data.error ? data.error : "The server refused (" + res.status + ").";
          throw new Error(msg);
        }
        return data;
      });
    });
  }

  function showError(button, message) {
    var el = button.nextElementSibling;
    if (el && el.getAttribute("role") === "alert") {
      el.textContent = message;
      el.hidden = false;
    }
  }

  function run(button) {
    var mode = button.getAttribute("data-webauthn");
    var begin = safePath(button.getAttribute("data-begin"));
    var finish = safePath(button.getAttribute("data-finish"));
    var next = safePath(button.getAttribute("data-next")) || "/";
    if (!begin || !finish || (mode !== "create" && mode !== "get")) return;
    if (!window.PublicKeyCredential || !navigator.credentials) {
      showError(button, "This browser does not support passkeys.");
      return;
    }
    var body = {};
    var labelId = button.getAttribute("data-label-input");
    if (labelId) {
      var input = document.getElementById(labelId);
      body.label = input ? input.value : "";
    }
    button.disabled = true;
    postJson(begin, body)
      .then(function (opts) {
        if (!opts || !opts.publicKey) throw new Error("The server sent no options.");
        if (mode === "create") {
          return navigator.credentials.create({ publicKey: creationOptions(opts.publicKey) });
        }
        return navigator.credentials.get({ publicKey: requestOptions(opts.publicKey) });
      })
      .then(function (cred) {
        if (!cred) throw new Error("No credential was chosen.");
        return postJson(finish, credentialJson(cred));
      })
      .then(function (data) {
        window.location.assign((data && safePath(data.next)) || next);
      })
      .catch(function (e) {
        button.disabled = false;
        showError(button, e && e.message ? e.message : "The passkey was not accepted.");
      });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var buttons = document.querySelectorAll("button[data-webauthn]");
    for (var i = 0; i < buttons.length; i++) {
      buttons[i].addEventListener("click", function (ev) {
        run(ev.currentTarget);
      });
    }
  });
})();
