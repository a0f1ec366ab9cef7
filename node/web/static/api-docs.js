// Starts Swagger UI (served by the node from the swagger-ui-bundle package) on the API's document.
"use strict";
window.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true, withCredentials: true, validatorUrl: null });
});
