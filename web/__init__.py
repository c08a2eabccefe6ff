"""The web pages for ops and admins (`web.enabled`): ledger, failures, tickets, rule playground
and dashboard, server-rendered by Starlette and Jinja2 on the admin HTTP listener. They show
the same views (views/) and call the same functions (pipeline.replay, pipeline.dryrun) as the
command line; cli.py's `serve` hands the routes to sources/http.py."""
