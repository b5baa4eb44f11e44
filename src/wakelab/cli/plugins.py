"""``wakelab plugins``: every plugin found, and the hooks it implements."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--contexts-markdown", is_flag=True, help="The hooks and their contexts as Markdown (docs/hooks.md).")
def plugins(as_json, contexts_markdown):
    """List every plugin found: where it comes from, its version, the hooks it implements and its config keys.

    \b
    Example:
      wakelab plugins
      wakelab plugins --json | jq '.[].name'
      wakelab plugins --contexts-markdown > docs/hooks.md
    """
    if contexts_markdown:
        from ..hooks.docs import reference_markdown

        click.echo(reference_markdown(), nl=False)
        return
    from ..hooks.registry import describe

    rows = describe()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max((len(r["name"]) for r in rows), default=4)
    for row in rows:
        hooks = ", ".join(row["hooks"]) if not row["error"] else f"BROKEN: {row['error']}"
        click.echo(f"{row['name']:<{width}}  {row['source']:<22}  {row['version'] or '-':<8}  {hooks}")
        if row.get("doc"):
            click.echo(f"{'':<{width}}  {row['doc']}")
        if row["config_keys"]:
            click.echo(f"{'':<{width}}  config: {', '.join(row['config_keys'])}")
