import { MainAreaWidget } from '@jupyterlab/apputils';
import { terminalIcon, ToolbarButton } from '@jupyterlab/ui-components';
import { ReadonlyJSONObject } from '@lumino/coreutils';
import { Widget } from '@lumino/widgets';

import { ConsoleState, TerminadoConsole } from './console';

/**
 * A main-area tab holding a `TerminadoConsole`, with a Reconnect button and the
 * connection state in its toolbar.
 *
 * `key` names the tab for the layout restorer (one tab per key) and `args` are what
 * the command that opened it needs to open it again after a reload.
 */
export class ConsoleTab extends MainAreaWidget<TerminadoConsole> {
  constructor(options: ConsoleTab.IOptions) {
    super({ content: new TerminadoConsole({ url: options.url }) });
    this.key = options.key;
    this.args = options.args;
    this.id = `twarga-console-${options.key.replace(/[^A-Za-z0-9_-]/g, '-')}`;
    this.addClass('twarga-console-tab');
    this.title.label = options.label;
    this.title.icon = terminalIcon;
    this.title.closable = true;

    this._state = document.createElement('span');
    this._state.className = 'twarga-console-state';
    this.content.stateChanged.connect(this._showState, this);
    this._showState();
    this.toolbar.addItem(
      'reconnect',
      new ToolbarButton({
        label: 'Reconnect',
        tooltip: 'Open the connection again',
        onClick: () => this.content.reconnect()
      })
    );
    this.toolbar.addItem('state', new Widget({ node: this._state }));
  }

  /** Which console this is, e.g. `vm-3` or `path-terminals/websocket/1`. */
  readonly key: string;

  /** The arguments of the command that opens this tab. */
  readonly args: ReadonlyJSONObject;

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this.content.stateChanged.disconnect(this._showState, this);
    super.dispose();
  }

  private _showState(): void {
    const state: ConsoleState = this.content.state;
    this._state.textContent = state;
  }

  private _state: HTMLSpanElement;
}

export namespace ConsoleTab {
  export interface IOptions {
    /** One tab per key: opening the same key again shows the tab already open. */
    key: string;
    /** The terminado websocket URL. */
    url: string;
    /** The tab's title. */
    label: string;
    /** The arguments of the command that opens this tab. */
    args: ReadonlyJSONObject;
  }
}
