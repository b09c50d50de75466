// Sign-in: come back to the page that was asked for (the URL's hash never reaches the server).
"use strict";
document.getElementById("next").value = window.location.hash;
