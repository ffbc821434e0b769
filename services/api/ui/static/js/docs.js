// Swagger UI over our OpenAPI document, read with the session cookie; calls made from
// "Try it out" carry the session's CSRF token like every other page's.
document.addEventListener("DOMContentLoaded", () => {
  const csrf = document.querySelector('meta[name="csrf-token"]')?.content ?? "";
  window.SwaggerUIBundle({
    url: "/api/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    requestInterceptor: (req) => {
      if (req.method && !["GET", "HEAD", "OPTIONS"].includes(req.method.toUpperCase())) {
        req.headers["X-CSRF-Token"] = csrf;
      }
      return req;
    },
  });
});
