import { Message } from '@lumino/messaging';
import { ISignal, Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';
// Console tabs are restored as the page starts: xterm.js is needed then, not later.
// eslint-disable-next-line jupyter/prefer-lazy-imports
import { FitAddon } from '@xterm/addon-fit';
// eslint-disable-next-line jupyter/prefer-lazy-imports
import { Terminal } from '@xterm/xterm';

/** Where a console connection is. */
export type ConsoleState = 'connecting' | 'connected' | 'disconnected';

/** The line written into the terminal when the socket closes. */
export const DISCONNECTED_MARKER = '[disconnected]';

/**
 * An xterm.js terminal wired to any websocket that speaks terminado's protocol.
 *
 * Client to server: `["stdin", text]` and `["set_size", rows, cols]`; server to client:
 * `["stdout", text]`, `["setup", {}]` and `["disconnect", ...]`. Used for VM consoles
 * (`twarga/api/vms/{id}/console`) and works the same against jupyter_server_terminals
 * (`terminals/websocket/{name}`). Authentication is the page's same-origin cookie.
 */
export class TerminadoConsole extends Widget {
  constructor(options: TerminadoConsole.IOptions) {
    super();
    this._url = options.url;
    this.addClass('twarga-console');
    this._screen = document.createElement('div');
    this._screen.className = 'twarga-console-screen';
    this.node.appendChild(this._screen);
    this._term = new Terminal({
      cursorBlink: true,
      fontFamily: 'Menlo, Consolas, "DejaVu Sans Mono", monospace',
      fontSize: 13,
      scrollback: 5000
    });
    this._fit = new FitAddon();
    this._term.loadAddon(this._fit);
    this._term.onData(data => this._send(['stdin', data]));
    this._setState('connecting');
  }

  /** The terminado websocket URL this console talks to. */
  get url(): string {
    return this._url;
  }

  /** Whether the socket is connecting, connected or closed. */
  get state(): ConsoleState {
    return this._state;
  }

  /** Emitted when `state` changes. */
  get stateChanged(): ISignal<this, ConsoleState> {
    return this._stateChanged;
  }

  /** The xterm.js terminal (for tests and for callers that want to write to it). */
  get terminal(): Terminal {
    return this._term;
  }

  /** Close the current socket, if any, and open a new one. */
  reconnect(): void {
    this._closeSocket();
    this._connect();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._closeSocket();
    this._term.dispose();
    Signal.clearData(this);
    super.dispose();
  }

  protected onAfterAttach(msg: Message): void {
    super.onAfterAttach(msg);
    if (!this._opened) {
      this._term.open(this._screen);
      this._opened = true;
      this._connect();
    }
    this._scheduleFit();
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    this._scheduleFit();
  }

  protected onResize(msg: Widget.ResizeMessage): void {
    super.onResize(msg);
    this._scheduleFit();
  }

  protected onFitRequest(msg: Message): void {
    super.onFitRequest(msg);
    this._scheduleFit();
  }

  protected onActivateRequest(msg: Message): void {
    super.onActivateRequest(msg);
    this._term.focus();
  }

  private _connect(): void {
    this._setState('connecting');
    this._announcedClose = false;
    const socket = new WebSocket(this._url);
    this._socket = socket;
    socket.onopen = () => {
      if (socket !== this._socket) {
        return;
      }
      this._setState('connected');
      this._lastSize = null;
      this._fitAndReport();
    };
    socket.onmessage = (event: MessageEvent) => {
      if (socket !== this._socket) {
        return;
      }
      this._receive(event.data);
    };
    socket.onclose = () => {
      if (socket !== this._socket) {
        return;
      }
      this._announceClose();
    };
  }

  private _receive(data: unknown): void {
    if (typeof data !== 'string') {
      return;
    }
    let message: unknown;
    try {
      message = JSON.parse(data);
    } catch {
      return;
    }
    if (!Array.isArray(message) || typeof message[0] !== 'string') {
      return;
    }
    switch (message[0]) {
      case 'stdout':
        if (typeof message[1] === 'string') {
          this._term.write(message[1]);
        }
        break;
      case 'disconnect':
        this._announceClose();
        this._closeSocket();
        break;
      default:
        // "setup" and anything newer carry nothing to show.
        break;
    }
  }

  private _announceClose(): void {
    if (this._announcedClose) {
      return;
    }
    this._announcedClose = true;
    this._term.write(`\r\n${DISCONNECTED_MARKER}\r\n`);
    this._setState('disconnected');
  }

  private _closeSocket(): void {
    const socket = this._socket;
    this._socket = null;
    if (socket) {
      socket.onopen = socket.onmessage = socket.onclose = null;
      socket.close();
    }
  }

  private _send(message: unknown[]): void {
    if (this._socket && this._socket.readyState === WebSocket.OPEN) {
      this._socket.send(JSON.stringify(message));
    }
  }

  /** Fit after layout settles: lumino sends resize before the browser has laid out. */
  private _scheduleFit(): void {
    if (this._fitPending) {
      return;
    }
    this._fitPending = true;
    requestAnimationFrame(() => {
      this._fitPending = false;
      this._fitAndReport();
    });
  }

  private _fitAndReport(): void {
    if (this.isDisposed || !this._opened || !this.isVisible) {
      return;
    }
    try {
      this._fit.fit();
    } catch {
      // xterm throws while its renderer has no size yet; the next resize fits it.
      return;
    }
    const { rows, cols } = this._term;
    const size = `${rows}x${cols}`;
    if (
      size !== this._lastSize &&
      this._socket?.readyState === WebSocket.OPEN
    ) {
      this._lastSize = size;
      this._send(['set_size', rows, cols]);
    }
  }

  private _setState(state: ConsoleState): void {
    this._state = state;
    this.node.dataset.state = state;
    this._stateChanged.emit(state);
  }

  private _url: string;
  private _screen: HTMLDivElement;
  private _term: Terminal;
  private _fit: FitAddon;
  private _socket: WebSocket | null = null;
  private _opened = false;
  private _fitPending = false;
  private _announcedClose = false;
  private _lastSize: string | null = null;
  private _state: ConsoleState = 'connecting';
  private _stateChanged = new Signal<this, ConsoleState>(this);
}

export namespace TerminadoConsole {
  export interface IOptions {
    /** A `ws:` or `wss:` URL of a terminado websocket. */
    url: string;
  }
}
